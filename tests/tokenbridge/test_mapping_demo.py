"""The mapping demo (``tokenbridge mapping-demo``), run as a user runs it: a separate process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.process]


@pytest.mark.slow
def test_mapping_demo_runs_end_to_end_and_reports_every_field(bank, tmp_path):
    out = tmp_path / "demo.json"
    env = {**os.environ, "TOKENBRIDGE_CACHE": str(bank.cache_dir)}
    # The limit is a stuck run's (20 s alone here), with room for a loaded machine.
    done = subprocess.run(
        [sys.executable, "-m", "tokenbridge", "mapping-demo", "--corpus-chars", "200000",
         "--json-out", str(out)],
        capture_output=True, text=True, env=env, timeout=1800, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "teacher qwen3.6 → student llama3" in done.stdout
    assert "teacher gpt2 → student mistral-v1" in done.stdout
    result = json.loads(out.read_text())
    for pair in result["pairs"]:
        n = len(pair["student_ids"])
        for field in ("logprobs_S", "chunk_ids_S", "z_S", "tail_mass_S", "unresolved_mass_S",
                      "exact_S", "topk_ids_SK", "topk_logprobs_SK"):  # fmt: skip
            assert len(pair[field]) == n, field
        assert pair["alignment"]["untiled_bytes"] == 0
        assert all(lp is not None and lp <= 0 for lp in pair["logprobs_S"])
