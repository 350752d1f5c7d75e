"""Peak resident memory of loading an adapter whose safetensors header lists a million empty tensors (the file's
checksum recomputed, as whoever made it would): `python -m bench.refused_load_memory [ENTRIES]`.

The load runs in a fresh process after a warm-up load of a good adapter, so only what the refused load itself
allocates shows in the growth of the peak (ru_maxrss).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = "adapter_model.safetensors"

_PROBE = textwrap.dedent(
    """
    import resource, sys
    from molora import MoLoRAModel
    from bench.refused_load_memory import tiny_llama
    MoLoRAModel.from_pretrained(tiny_llama(), sys.argv[1])  # every import and first-call cost paid
    base = tiny_llama()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        MoLoRAModel.from_pretrained(base, sys.argv[2])
        print("LOADED")
    except ValueError as err:
        print("REFUSED", str(err).splitlines()[0][:300])
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    """
)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, num_hidden_layers=2, **sizes))


def save_good_adapter(folder: Path) -> Path:
    from molora import MoLoRAConfig, get_molora_model

    config = MoLoRAConfig(target_modules=["q_proj", "v_proj", "down_proj"], num_experts=4, rank=4)
    get_molora_model(tiny_llama(), config).save_pretrained(folder)
    return folder


def write_padded_adapter(good: Path, folder: Path, entries: int) -> Path:
    """`good`'s adapter with `entries` empty tensors added to its header, its checksum recomputed if it has one
    (adapters of molora before format 2 had none: the script runs on such a checkout too)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "molora_config.json").write_bytes((good / "molora_config.json").read_bytes())
    raw = (good / WEIGHTS).read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8 : 8 + length]), raw[8 + length :]
    end = len(data)
    body = ",".join(f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[{end},{end}]}}' for i in range(entries))
    text = (json.dumps(header)[:-1] + "," + body + "}").encode()
    (folder / WEIGHTS).write_bytes(len(text).to_bytes(8, "little") + text + data)
    config = json.loads((folder / "molora_config.json").read_text())
    if "sha256" in config:
        from molora.deploy.adapter_files import adapter_file_digest

        del config["sha256"]
        config["sha256"] = adapter_file_digest(folder / WEIGHTS, config)
        (folder / "molora_config.json").write_text(json.dumps(config, indent=2))
    return folder


def measure(good: Path, padded: Path) -> tuple[str, int]:
    """(what the load said, growth of the peak resident memory in bytes), from a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    probe = [sys.executable, "-c", _PROBE, str(good), str(padded)]
    done = subprocess.run(probe, capture_output=True, text=True, timeout=300, cwd=REPO, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    *_, outcome, growth = done.stdout.strip().splitlines()
    return outcome, int(growth)


def main() -> None:
    entries = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    with tempfile.TemporaryDirectory() as tmp:
        good = save_good_adapter(Path(tmp) / "good")
        padded = write_padded_adapter(good, Path(tmp) / "padded", entries)
        outcome, growth = measure(good, padded)
        size = (padded / WEIGHTS).stat().st_size
    print(f"{entries} empty tensors, file {size / 2**20:.1f} MiB: {outcome}")
    print(f"peak resident memory growth: {growth / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
