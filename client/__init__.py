"""tokenbridge.client: the student's on-policy trainer and its async teacher client. It builds
on ``tokenbridge.shared`` and never imports ``tokenbridge.service``."""
