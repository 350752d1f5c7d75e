"""Files from elsewhere: format versions, strict JSON, safetensors read with bounded memory, the Hub."""
