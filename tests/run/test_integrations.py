import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import concatenate_datasets
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from molora import MoLoRAConfig, get_molora_model
from molora.run.data import DataConfig, MultiDomainData
from molora.run.integrations import MoLoRADataCollator, MoLoRATrainer
from tests.tiny import save_tiny_model, write_toy_domains


def test_hf_trainer_trains_with_the_aux_loss_and_logs_router_health(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = MultiDomainData(
        DataConfig(domains=["upper", "reverse"], files=[str(write_toy_domains(tmp_path / "toy.jsonl"))]), tokenizer
    )
    dataset = concatenate_datasets([d.train for d in data.domains])
    model = get_molora_model(
        AutoModelForCausalLM.from_pretrained(model_dir),
        MoLoRAConfig(target_modules=["q_proj", "v_proj"], router="task", num_tasks=2, aux_losses={"balance": 0.5}),
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = MoLoRATrainer(
        model=model, args=args, train_dataset=dataset, data_collator=MoLoRADataCollator(tokenizer.pad_token_id)
    )
    calls = []
    original = model.aux_loss
    model.aux_loss = lambda: calls.append(1) or original()
    trainer.train()
    assert len(calls) == 4  # the aux loss was part of every step's objective
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs and all("aux/balance" in entry and "router_entropy" in entry for entry in logs)
    for name, param in model.named_parameters():
        if name in before and ".router." in name:
            assert not torch.equal(param, before[name]), name  # the task router trained through the aux loss

    # The objective on a fixed batch is exactly the model's loss plus its weighted aux loss (not the loss alone).
    batch = MoLoRADataCollator(tokenizer.pad_token_id)([dataset[i] for i in range(4)])
    with torch.no_grad():
        objective = trainer.compute_loss(model, batch)
        outputs = model(**batch)
        aux = model.aux_loss()
    assert aux > 0.1  # balance at weight 0.5: far from a rounding error
    torch.testing.assert_close(objective, outputs.loss + aux, rtol=0, atol=1e-6)


ACCELERATE_FSDP = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 2
mixed_precision: 'no'
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer
"""
TRAINER_SCRIPT = """
import sys
from transformers import AutoModelForCausalLM, TrainingArguments
from molora import MoLoRAConfig, get_molora_model
from molora.run.integrations import MoLoRATrainer
model = get_molora_model(AutoModelForCausalLM.from_pretrained(sys.argv[1]), MoLoRAConfig(target_modules=["q_proj"]))
MoLoRATrainer(model=model, args=TrainingArguments(output_dir=sys.argv[2], report_to=[], max_steps=1))
print("trainer built")
"""


def test_a_multi_process_launch_accelerate_does_not_distribute_is_refused_by_name(tmp_path):
    """accelerate 1.16 with an FSDP config on a machine without a GPU starts two processes with DistributedType.NO:
    each would train alone. MoLoRATrainer refuses that, naming what to launch instead (accelerate 1.3, the declared
    floor, still refused FSDP without a GPU by itself)."""
    if torch.cuda.is_available():
        pytest.skip("with a GPU accelerate shards: this is the CPU-only case")
    model_dir = save_tiny_model(tmp_path / "model")
    (tmp_path / "fsdp.yaml").write_text(ACCELERATE_FSDP)
    (tmp_path / "script.py").write_text(TRAINER_SCRIPT)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "fsdp.yaml")]
    command += [str(tmp_path / "script.py"), str(model_dir), str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "trainer built" not in done.stdout
    if "no available devices found" in done.stderr:  # accelerate 1.3 (the floor) refuses FSDP on CPU by itself
        return
    assert "set up no distributed training (DistributedType.NO)" in done.stderr, done.stderr[-3000:]
    assert "launch with torchrun" in done.stderr
