"""Engine KV-event ingestion: vLLM/SGLang ZMQ streams decoded (`wire`) and followed (`stream`)."""
