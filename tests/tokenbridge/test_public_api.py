"""The public names of tokenbridge.shared are a contract: changing them is a deliberate act."""

import tokenbridge.shared as shared

EXPECTED = {
    "GAP_ID", "ROLES", "Alignment", "AlignmentError", "AlignmentReport", "MappedCompletion",
    "PairMapper", "PairTable", "ScoresShapeError", "StudentTrie", "TableCache", "TeacherScores",
    "TeacherView", "TelescopedLogprobs", "TokenbridgeError", "TokenizerUnsupportedError", "Vocab",
    "align", "build_pair_table", "build_vocab", "encode_continuation", "special_token_map",
    "teacher_view", "token_widths",
}  # fmt: skip


def test_public_names_are_pinned():
    assert set(shared.__all__) == EXPECTED
    for name in EXPECTED:
        assert getattr(shared, name) is not None


def test_every_error_is_a_tokenbridge_error():
    for name in ("AlignmentError", "ScoresShapeError", "TokenizerUnsupportedError"):
        assert issubclass(getattr(shared, name), shared.TokenbridgeError)
