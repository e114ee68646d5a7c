"""tokenbridge: on-policy distillation across model families.

``tokenbridge.shared`` holds the wire protocol and the byte-exact vocabulary, alignment and
mapping code; ``tokenbridge.service`` the teacher-scoring service; ``tokenbridge.client`` the
student's trainer. ``tokenbridge.hub`` loads tokenizers (offline ones included).
"""

__version__ = "0.1.0"
