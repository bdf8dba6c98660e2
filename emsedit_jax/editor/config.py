"""Editor configuration (static: hashable, passed to jit as a static argument)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp

METHODS = ("emsedit", "mend", "malmen", "rledit")


@dataclasses.dataclass(frozen=True)
class EditorConfig:
    """Everything that fixes the editor's computation.

    method:        emsedit | mend | malmen | rledit.
    modules:       edited linear modules, Hugging Face names.
    steps:         T, edit steps per request batch (EMSEdit default 2; baselines 1,
                   "Method²" = the same method with steps=2).
    step_specific: one hypernetwork per step (sequential editing; step t has rank
                   rank // (t+1)) or one shared by all steps (batch editing).
    msbp:          "detached" (the paper's: keys and value gradients of each step are
                   constants) or "exact" (gradients also flow through how a step's
                   keys and value gradients depend on earlier steps).
    log_step_size: learn log(eta) instead of eta (like lamda, which is always learned
                   in log space); Adam then changes eta by a relative amount per step.
                   The authors' parametrisation is linear (False).
    regulariser:   "norm" (EMSEdit: beta * sum ||W_T - W_0||^2) or "kl" (baselines:
                   loc_coef * KL on locality prompts + 1e-4 * sum ||dW||^2).
    key_memory:    mu >= 0. With mu > 0 the ridge solve of a batch also penalises changing
                   the outputs at the keys of the stream's earlier batches:
                   dW = (U^T U + e^lamda I + mu G)^-1 U^T D, G = sum of their U^T U
                   (an extension, not the paper's solve; 0 = the paper's).
    loc_prior:     nu >= 0, needs key_memory > 0. Each stream's key memory starts at
                   (nu / mu) C0 instead of zeros, so the solve becomes
                   dW = (U^T U + e^lamda I + nu C0 + mu G)^-1 U^T D: C0 is the mean k k^T
                   of keys of unrelated prompts (evaluate.locality_gram: the locality
                   prompts of the training requests), and nu C0 penalises moving the
                   module's output on such keys, as if nu of them were in the memory.
                   An evaluation-time extension (MEMIT's covariance term applied to the
                   hypernetwork's solve); 0 = none. Training uses it too when set
                   (train.train's key_prior), so the hypernetwork learns with it.
    null_space:    tau in [0, 1). With tau > 0 every step's update dW (d_in, d_out) is
                   replaced by P dW, P = I - V V^T, V the eigenvectors of the preserved
                   keys' C0 whose eigenvalues exceed tau times the largest: outputs
                   k^T (W + dW) on keys k in that span do not move (AlphaEdit's
                   projection, an extension; 0 = none). Needs C0 like loc_prior.
    key_positions: where a step takes its keys and value gradients: "answer" (the
                   paper's: the answer positions), "subject" (the last token of the
                   request's subject, as in MEMIT / AlphaEdit; requests without a
                   subject in the prompt fall back to their answer positions) or
                   "both" (the union). An extension; the loss is always the answer's.
    back_depth:    memory backtracking in sequential training: the losses of the
                   stream's last back_depth - 1 earlier batches, weighted time_decay **
                   age, join each batch's loss (RLEdit's; None = the method's default:
                   10 for RLEdit, 1 = none for the others).
    solve:         "looped" (one ridge solve per module), "batched" (one vmapped solve)
                   or "auto" (by backend: `backend.solve`). Speed only.
    hypernet:      "unrolled" (each block's arrays used as stored), "scanned" (blocks
                   stacked, one lax.scan) or "auto" (by backend: `backend.hypernet`).
                   Speed only. Neither is saved with a trained editor (load_editor
                   resets both to "auto").
    """
    modules: tuple[str, ...]
    method: Literal["emsedit", "mend", "malmen", "rledit"] = "emsedit"
    steps: int = 2
    step_specific: bool = True
    rank: int = 1024
    n_blocks: int = 4
    lr_init: float = 1e-6
    log_step_size: bool = False
    lamda_init: float = 0.0
    key_memory: float = 0.0
    loc_prior: float = 0.0
    null_space: float = 0.0
    key_positions: Literal["answer", "subject", "both"] = "answer"
    msbp: Literal["detached", "exact"] = "detached"
    regulariser: Literal["norm", "kl"] = "norm"
    beta: float = 0.5
    loc_coef: float = 0.6
    delta_coef: float = 1e-4
    back_depth: int | None = None
    time_decay: float = 0.95
    norm_eps: float = 1e-5
    solve: Literal["auto", "looped", "batched"] = "auto"
    hypernet: Literal["auto", "unrolled", "scanned"] = "auto"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r} (choose from {', '.join(METHODS)})")
        if not self.modules:
            raise ValueError("EditorConfig.modules is empty: name at least one module to edit")
        if self.steps < 1:
            raise ValueError("steps must be >= 1")
        if self.key_memory < 0:
            raise ValueError("key_memory must be >= 0 (0: the paper's ridge solve)")
        if self.key_memory and self.update_rule != "ridge":
            raise ValueError("key_memory applies to the ridge solve; MEND's rank-1 update has none")
        if self.loc_prior < 0:
            raise ValueError("loc_prior must be >= 0 (0: none)")
        if self.loc_prior and not self.key_memory:
            raise ValueError("loc_prior is the starting value of the key memory: it needs key_memory > 0")
        if not 0 <= self.null_space < 1:
            raise ValueError(f"null_space must be in [0, 1) (a fraction of C0's largest eigenvalue; 0: none), "
                             f"not {self.null_space}")
        if self.null_space and self.update_rule != "ridge":
            raise ValueError("null_space projects the ridge solve's update; MEND's rank-1 update has none")
        if self.key_positions not in ("answer", "subject", "both"):
            raise ValueError(f"key_positions must be 'answer', 'subject' or 'both', not {self.key_positions!r}")
        if self.back_depth is None:
            object.__setattr__(self, "back_depth", 10 if self.method == "rledit" else 1)
        if self.back_depth < 1:
            raise ValueError("back_depth must be >= 1 (1: no memory backtracking)")
        if self.msbp not in ("detached", "exact"):
            raise ValueError(f"msbp must be 'detached' or 'exact', not {self.msbp!r}")
        if self.regulariser not in ("norm", "kl"):
            raise ValueError(f"regulariser must be 'norm' or 'kl', not {self.regulariser!r}")
        if self.solve not in ("auto", "looped", "batched"):
            raise ValueError(f"solve must be 'auto', 'looped' or 'batched', not {self.solve!r}")
        if self.hypernet not in ("auto", "unrolled", "scanned"):
            raise ValueError(f"hypernet must be 'auto', 'unrolled' or 'scanned', not {self.hypernet!r}")

    def solve_mode(self) -> str:
        """"looped" or "batched": `solve`, or the backend's default for "auto"."""
        from ..backend import solve
        return solve() if self.solve == "auto" else self.solve

    def hypernet_mode(self) -> str:
        """"unrolled" or "scanned": `hypernet`, or the backend's default for "auto"."""
        from ..backend import hypernet
        return hypernet() if self.hypernet == "auto" else self.hypernet

    @property
    def needs_prior(self) -> bool:
        """Whether a stream needs C0 (the preserved keys' mean k k^T) to start."""
        return bool(self.loc_prior or self.null_space)

    def key_slots(self, n_answer: int) -> int:
        """Key slots per packed row for `n_answer` answer slots: a request's subject
        slot replaces its answer slots ("subject") or joins them ("both")."""
        return 2 * n_answer if self.key_positions == "both" else n_answer

    @property
    def n_param_sets(self) -> int:
        """How many hypernetwork parameter sets the editor keeps (T or 1)."""
        return self.steps if self.step_specific else 1

    def step_size(self, raw):
        """eta_k from its stored parameter."""
        return jnp.exp(raw) if self.log_step_size else raw

    @property
    def update_rule(self) -> str:
        return "rank1" if self.method == "mend" else "ridge"

    def step_ranks(self) -> tuple[int, ...]:
        """Rank of each parameter set."""
        if not self.step_specific:
            return (self.rank,)
        return tuple(max(1, self.rank // (t + 1)) for t in range(self.steps))

    @property
    def memory_slots(self) -> int:
        """Earlier batches of a training stream whose losses are added back (RLEdit's
        memory backtracking: the last back_depth batches, the current one included).
        RLEdit's default depth is 10; the other methods default to 1 (no memory), and
        back_depth > 1 gives them the same backtracking (an extension, not in their papers)."""
        return max(0, self.back_depth - 1)


# What distinguishes the methods when nothing else is overridden. Every other field
# (rank, blocks, step size, ...) is shared, so the methods differ by configuration alone.
METHOD_DEFAULTS: dict[str, dict] = {
    "emsedit": {"steps": 2, "regulariser": "norm"},
    "mend": {"steps": 1, "regulariser": "kl"},
    "malmen": {"steps": 1, "regulariser": "kl"},
    "rledit": {"steps": 1, "regulariser": "kl"},
}


def parse_method(name: str) -> tuple[str, int | None]:
    """'malmen' -> ('malmen', None); 'malmen2' (Method², MSBP plugged in) -> ('malmen', 2)."""
    if name in METHODS:
        return name, None
    base = name.rstrip("0123456789")
    if base in METHODS and base != name:
        return base, int(name[len(base):])
    raise ValueError(f"unknown method {name!r} (choose from {', '.join(METHODS)}, optionally followed by "
                     "a step count, e.g. malmen2)")


def method_config(method: str, modules, steps: int | None = None, **overrides) -> EditorConfig:
    """The editor configuration of `method` with its defaults (METHOD_DEFAULTS):
    EMSEdit 2 steps with the norm regulariser, MEND / MALMEN / RLEdit 1 step with the KL
    regulariser. `steps` (or a name like 'rledit2') gives "Method²", the same method
    with T steps; `overrides` set any other EditorConfig field."""
    base, named_steps = parse_method(method)
    if steps is not None and named_steps is not None and steps != named_steps:
        raise ValueError(f"method {method!r} names {named_steps} steps but steps={steps}")
    fields = {**METHOD_DEFAULTS[base], **overrides}
    if steps is not None or named_steps is not None:
        fields["steps"] = steps if steps is not None else named_steps
    return EditorConfig(modules=tuple(modules), method=base, **fields)
