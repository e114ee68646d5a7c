"""tokenbridge.service: the teacher-scoring service (FastAPI + uvicorn, vLLM and transformers
engines). It builds on ``tokenbridge.shared`` and never imports ``tokenbridge.client``."""
