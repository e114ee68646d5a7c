"""Research code: what measures whether distillation teaches, not what serves or trains.

``task`` (worked addition), ``textcont`` (Shakespeare continuation), ``taskmodels`` (the tiny
teacher and warm starts fitted on them), ``exactkl`` (the exact per-position reverse KL and the
one-step check) and ``experiment`` (``tokenbridge experiment`` and ``tokenbridge demo``). The
service, client and shared packages never import it (``tests/tokenbridge/test_architecture.py``).
"""
