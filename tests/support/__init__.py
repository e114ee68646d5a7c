"""Helpers the tests share, imported as ``tests.support.<module>`` (the repository root is on the
path through pytest's ``pythonpath``):

* ``paths``: ``REPO`` and ``CACHE_DIR`` (``TOKENBRIDGE_CACHE`` or ``<repo>/.cache``)
* ``tokenizers``: the offline tokenizers, the cross-family pairs and ``TokenizerBank``
* ``service``: tiny teachers, the app in-process (``AppHarness``, ``running_app``) and as a process
* ``fuzz``: settings and strategies of the fuzz tests
* ``synthetic``: synthetic teacher scores; ``texts``: fixed and adversarial sample texts
"""
