"""The data section of a run config: which domains and files, the splits, mixing and tokenisation settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from molora.run.domains import BUILTIN_DOMAINS, SUITES

MIXINGS = ("proportional", "temperature")
LOSS_ON = ("response", "all")


@dataclass
class DataConfig:
    """domains: built-in names and/or domain names found in `files` (JSONL or CSV, one example per row)."""

    domains: list[str] = field(default_factory=lambda: list(SUITES["bundled"]))  # or a suite's name
    files: list[str] = field(default_factory=list)
    text_field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    domain_field: str = "domain"
    max_length: int = 256
    max_examples_per_domain: int | None = None
    eval_fraction: float = 0.1
    max_eval_per_domain: int | None = 64
    # A validation split beside eval (0: none), for choices such as configs and learning rates; eval stays untouched
    # by them. Drawn after the eval prompts, so turning it on leaves the eval split as it was.
    val_fraction: float = 0.0
    max_val_per_domain: int | None = 64
    mixing: str = "proportional"
    temperature: float = 2.0
    loss_on: str = "response"
    use_chat_template: bool = True
    seed: int = 0
    # Drop exact repeats of a (prompt, response) record within a domain, keeping the first. The built-in qa domain
    # (ChatterBot) holds 2,026 records but 898 distinct ones, one of them 121 times: unchecked, one sentence can be
    # half a split's loss. Off by default so that runs (and checkpoints) made before it existed read as they ran.
    dedupe: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.domains, str):
            self.domains = list(SUITES.get(self.domains, [self.domains]))
        if not self.domains:
            raise ValueError("data.domains must name at least one domain")
        for path in self.files:
            if not Path(path).is_file():
                raise FileNotFoundError(f"data.files: {path} does not exist")
            if Path(path).suffix not in (".jsonl", ".json", ".csv"):
                raise ValueError(f"data.files: {path} must be .jsonl or .csv")
        if not self.files:
            unknown = [d for d in self.domains if d not in BUILTIN_DOMAINS]
            if unknown:
                raise ValueError(
                    f"data.domains: unknown domain(s) {unknown}; built-in: {sorted(BUILTIN_DOMAINS)}; suites: "
                    f"{sorted(SUITES)}"
                )
        if self.mixing not in MIXINGS:
            raise ValueError(f"data.mixing must be one of {MIXINGS}, got {self.mixing!r}")
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"data.loss_on must be one of {LOSS_ON}, got {self.loss_on!r}")
        if not isinstance(self.max_length, int) or self.max_length < 8:
            raise ValueError(f"data.max_length must be an int >= 8, got {self.max_length!r}")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"data.eval_fraction must be in (0, 1), got {self.eval_fraction!r}")
        if not 0 <= self.val_fraction < 1 or self.eval_fraction + self.val_fraction >= 1:
            raise ValueError(
                f"data.val_fraction must be in [0, 1) and leave training examples beside eval_fraction, got "
                f"{self.val_fraction!r} (eval_fraction {self.eval_fraction!r})"
            )
        if self.temperature <= 0:
            raise ValueError(f"data.temperature must be > 0, got {self.temperature!r}")
        if not isinstance(self.dedupe, bool):
            raise ValueError(f"data.dedupe must be true or false, got {self.dedupe!r}")
