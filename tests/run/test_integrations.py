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
