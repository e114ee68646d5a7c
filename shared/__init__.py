"""tokenbridge.shared: the code both the service and the client use. Pure: no network, no engine.

Public names (pinned by ``tests/tokenbridge/test_public_api.py``):

* vocabularies: ``Vocab``, ``build_vocab``, ``ROLES``
* tables: ``PairTable``, ``StudentTrie``, ``build_pair_table``, ``TableCache``
* alignment: ``align``, ``Alignment``, ``AlignmentReport``, ``encode_continuation``,
  ``teacher_view``, ``TeacherView``, ``token_widths``, ``special_token_map``, ``GAP_ID``
* mapping: ``PairMapper``, ``TeacherScores``, ``MappedCompletion``, ``TelescopedLogprobs``
* errors: ``TokenbridgeError`` and its subclasses
"""

from tokenbridge.shared.align import (
    GAP_ID,
    Alignment,
    AlignmentReport,
    TeacherView,
    align,
    encode_continuation,
    special_token_map,
    teacher_view,
    token_widths,
)
from tokenbridge.shared.cache import TableCache
from tokenbridge.shared.errors import (
    AlignmentError,
    ScoresShapeError,
    TokenbridgeError,
    TokenizerUnsupportedError,
)
from tokenbridge.shared.mapping import (
    MappedCompletion,
    PairMapper,
    TeacherScores,
    TelescopedLogprobs,
)
from tokenbridge.shared.tables import PairTable, StudentTrie, build_pair_table
from tokenbridge.shared.vocab import ROLES, Vocab, build_vocab

__all__ = [
    "GAP_ID",
    "ROLES",
    "Alignment",
    "AlignmentError",
    "AlignmentReport",
    "MappedCompletion",
    "PairMapper",
    "PairTable",
    "ScoresShapeError",
    "StudentTrie",
    "TableCache",
    "TeacherScores",
    "TeacherView",
    "TelescopedLogprobs",
    "TokenbridgeError",
    "TokenizerUnsupportedError",
    "Vocab",
    "align",
    "build_pair_table",
    "build_vocab",
    "encode_continuation",
    "special_token_map",
    "teacher_view",
    "token_widths",
]
