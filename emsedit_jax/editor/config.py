"""Editor configuration (static: hashable, passed to jit as a static argument).

The field defaults are the working ones (the command line shows and uses the same); the
authors' values are the "faithful" preset (train.PRESETS)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from ..errors import ConfigError
from ..options import check_fields, option

METHODS = ("emsedit", "mend", "malmen", "rledit")


# What distinguishes the methods when nothing else is overridden. Every other field
# (rank, blocks, step size, ...) is shared, so the methods differ by configuration alone.
# EMSEdit's default solve is the extension that keeps edits local (key memory 1 with
# locality prior 100, 20 with keys at the subject: experiments/README.md, "Defaults"),
# with each step's update capped at 0.03 of the kernel's norm ("A trust region for each
# step"); the baselines keep their papers'.
# A shared hypernetwork (step_specific=False, the batch protocol's) takes "shared_steps"
# steps: one batch of hundreds of edits needs more steps than a batch of ten, and a
# looser cap ("shared_max_update"; 0.03 costs one batch of 400 ZsRE edits 2.3 points of
# GS, 0.1 keeps 75.9: experiments/README.md, "A trust region for each step"). Keys at the
# subject (key_positions="subject", read in middle layers: default_modules) take
# "subject_steps": the edit sits about twenty layers below the answer it must move; and
# the looser cap too (0.03 costs CounterFact's 10 x 10 stream 5 points of ES).
METHOD_DEFAULTS: dict[str, dict] = {
    "emsedit": {"steps": 3, "shared_steps": 8, "subject_steps": 6, "regulariser": "norm", "key_memory": 1.0,
                "loc_prior": 100.0, "subject_loc_prior": 20.0, "max_update": 0.03,
                "shared_max_update": 0.1, "subject_max_update": 0.1, "train_max_update": 0.1},
    "mend": {"steps": 1, "regulariser": "kl", "key_memory": 0.0, "loc_prior": 0.0, "max_update": 0.0,
             "train_max_update": 0.0},
    "malmen": {"steps": 1, "regulariser": "kl", "key_memory": 0.0, "loc_prior": 0.0, "max_update": 0.0,
               "train_max_update": 0.0},
    "rledit": {"steps": 1, "regulariser": "kl", "key_memory": 0.0, "loc_prior": 0.0, "max_update": 0.0,
               "train_max_update": 0.0},
}


@dataclasses.dataclass(frozen=True)
class EditorConfig:
    """Everything that fixes the editor's computation.

    method:        emsedit | mend | malmen | rledit.
    modules:       edited linear modules, Hugging Face names.
    steps:         T, edit steps per request batch (EMSEdit default 3, the paper's 2, 8
                   with a shared hypernetwork and 6 with subject keys; baselines 1,
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
                   of keys of unrelated prompts (evaluate.preserved_gram: by default the
                   locality prompts of the training requests), and nu C0 penalises
                   moving the module's output on such keys, as if nu of them were in the
                   memory. An extension (MEMIT's covariance term applied to the
                   hypernetwork's solve); 0 = none. Training uses it too when set
                   (train.train's key_prior), so the hypernetwork learns with it.
    prior_positions: where C0 takes the keys of the preserved prompts: "keys" (the
                   editor's key positions, e.g. the answer tokens) or "all" (every
                   token of each prompt and its answer but the first, as MEMIT's
                   covariance is taken over whole texts: an update moves a module's
                   output at every position of an unrelated prompt, not only at its
                   answer). An extension; "all" did not win across data sets and
                   protocols (experiments/README.md, "C0 over every token").
    null_space:    tau in [0, 1). With tau > 0 every step's update dW (d_in, d_out) is
                   replaced by P dW, P = I - V V^T, V the eigenvectors of the preserved
                   keys' C0 whose eigenvalues exceed tau times the largest: outputs
                   k^T (W + dW) on keys k in that span do not move (AlphaEdit's
                   projection, an extension; 0 = none). Needs C0 like loc_prior.
    max_update:    rho >= 0. With rho > 0 each step's update dW of a module is scaled down,
                   where needed, to a Frobenius norm of at most rho ||W||_F (W the
                   unedited kernel): a trust region that keeps one outlying request (a
                   value gradient many standard deviations from those the hypernetwork
                   was normalised on) from rewriting a module in one step, or a run of
                   large updates from wearing a stream's earlier edits away. An
                   extension; 0 = none (the paper's); EMSEdit's default 0.03, 0.1 with
                   a shared hypernetwork (the batch protocol) or keys at the subject.
    train_max_update: rho_T >= 0, the same cap during meta-training (training()). EMSEdit's
                   default 0.1 (0 when max_update is 0): a loose cap that rarely binds
                   lets the hypernetwork learn updates of their natural size, and the
                   tighter edit-time cap then trims only the unusually long ones (trained
                   at 0.03, the editors make more updates at the cap and lose more of a
                   long stream: experiments/README.md, "A trust region for each step").
    key_positions: where a step takes its keys and value gradients: "answer" (the
                   paper's: the answer positions), "subject" (the last token of the
                   request's subject, as in MEMIT / AlphaEdit; requests without a
                   subject in the prompt fall back to their answer positions) or
                   "both" (the union). An extension; the loss is always the answer's.
                   With "subject" the default modules are those of the middle layers
                   (default_modules) and EMSEdit's default T is 6: the CounterFact
                   preset (train.PRESETS), where edits at the answer positions also
                   flip unrelated facts of the same relation.
    back_depth:    memory backtracking in sequential training: the losses of the
                   stream's last back_depth - 1 earlier batches, weighted time_decay **
                   age, join each batch's loss (RLEdit's; None = the method's default:
                   10 for RLEdit, 1 = none for the others).
    solve:         "looped" (one ridge solve per module), "batched" (one vmapped solve)
                   or "auto" (by backend: `backend.solve`). Speed only.
    hypernet:      "unrolled" (each block's arrays used as stored), "scanned" (blocks
                   stacked, one lax.scan) or "auto" (by backend: `backend.hypernet`).
                   Speed only. Neither is kept with a trained editor (load_editor
                   resets both to "auto").
    """
    modules: tuple[str, ...] = option(help="edited linear modules, Hugging Face names", cli=False)
    method: Literal["emsedit", "mend", "malmen", "rledit"] = option("emsedit", "editing method")
    steps: int | None = option(None, "edit steps T per batch (--method malmen --steps 2 is MALMEN²)",
                               check="positive",
                               default_text="the method's: emsedit 3 (8 for the batch protocol, 6 with subject "
                               "keys), the others 1")
    step_specific: bool = option(True, "one hypernetwork per edit step (sequential editing) instead of one shared",
                                 cli=False)
    rank: int = option(256, "rank of the hypernetworks (step t of a step-specific editor: rank // (t+1))",
                       check="positive")
    n_blocks: int = option(4, "residual blocks per hypernetwork", check="positive", flag="--blocks")
    lr_init: float = option(1e-3, "initial step size eta", check="positive")
    log_step_size: bool = option(True, "learn log(eta) rather than eta (the authors': off)")
    lamda_init: float = option(0.0, "initial log ridge weight lamda")
    key_memory: float | None = option(None, "MU: ridge solve against the stream's earlier keys: dW = (U^T U + "
                                      "e^lamda I + MU G)^-1 U^T D, G = sum of the earlier batches' U^T U (0: the "
                                      "paper's solve; an extension)", check="nonneg", metavar="MU",
                                      default_text="the method's: emsedit 1, the others 0")
    loc_prior: float | None = option(None, "NU: start each stream's key memory at NU C0, C0 the mean k k^T of the "
                                     "keys of the training requests' preserved facts (--prior-source): dW = (U^T U "
                                     "+ e^lamda I + NU C0 + MU G)^-1 U^T D (needs --key-memory; an extension)",
                                     check="nonneg", metavar="NU",
                                     default_text="the method's: emsedit 100 (20 with subject keys), the others 0; 0 with "
                                                  "--key-memory 0")
    prior_positions: Literal["keys", "all"] = option(
        "keys", "where C0 (--loc-prior, --null-space) takes the preserved prompts' keys: at the editor's key "
        "positions (keys) or at every token but the first (all; an extension)")
    null_space: float = option(0.0, "TAU: project every update onto the null space of C0: dW <- (I - V V^T) dW, V the "
                               "eigenvectors of C0 with eigenvalue above TAU times the largest (AlphaEdit's "
                               "projection; an extension; 0: none)", check="nonneg", metavar="TAU")
    max_update: float | None = option(None, "RHO: scale each step's update dW of a module down to at most RHO ||W|| "
                                      "(Frobenius norms, W unedited; an extension; 0: no cap)", check="nonneg",
                                      metavar="RHO", default_text="the method's: emsedit 0.03 (0.1 for the batch "
                                      "protocol or with subject keys), the others 0")
    train_max_update: float | None = option(
        None, "RHO_T: the trust region of each step's update during meta-training (as --max-update; 0: no cap)",
        check="nonneg", metavar="RHO_T", default_text="the method's: emsedit 0.1 (0 with --max-update 0), the "
        "others 0")
    key_positions: Literal["answer", "subject", "both"] = option(
        "answer", "where keys and value gradients are taken: answer positions (the paper's), the subject's last token "
        "(answer positions for prompts without the subject) or both (an extension)")
    msbp: Literal["detached", "exact"] = option("detached", "multi-step backpropagation: the paper's detached "
                                                "keys and value gradients, or exact gradients through them")
    regulariser: Literal["norm", "kl"] | None = option(None, "training regulariser",
                                                       default_text="the method's: emsedit norm, the others kl")
    beta: float = option(3e-3, "weight of the norm regulariser (the authors': 0.5, squared)", check="nonneg")
    loc_coef: float = option(0.6, "weight of the KL regulariser on locality prompts", check="nonneg")
    delta_coef: float = option(1e-4, "weight of sum ||dW||^2 beside the KL regulariser", check="nonneg")
    back_depth: int | None = option(None, "memory backtracking: add the weighted losses of the stream's last N-1 "
                                    "earlier batches (for EMSEdit an extension)", check="positive", metavar="N",
                                    default_text="the method's: rledit 10, the others 1 = none")
    time_decay: float = option(0.95, "weight decay per batch of age in memory backtracking", check="nonneg")
    norm_eps: float = option(1e-5, "epsilon of the hypernetworks' input normalisation", check="nonneg")
    solve: Literal["auto", "looped", "batched"] = option(
        "auto", "ridge solves one module at a time (looped) or as one batched solve; speed only",
        default_text="auto: by backend, looped on CPU, batched on GPU / TPU")
    hypernet: Literal["auto", "unrolled", "scanned"] = option(
        "auto", "hypernetwork blocks one after the other (unrolled) or stacked in a scan; speed only",
        default_text="auto: by backend, unrolled on CPU, scanned on GPU / TPU")

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"EditorConfig.method: expected one of {', '.join(METHODS)}, got {self.method!r}")
        defaults = dict(METHOD_DEFAULTS[self.method])
        if self.key_positions == "subject":
            for name in ("steps", "loc_prior", "max_update"):
                defaults[name] = defaults.get(f"subject_{name}", defaults[name])
        if not self.step_specific:
            for name in ("steps", "max_update"):
                defaults[name] = defaults.get(f"shared_{name}", defaults[name])
        if self.key_memory == 0 or (self.key_memory is None and defaults["key_memory"] == 0):
            defaults["loc_prior"] = 0.0                # the paper's solve: no memory, no prior
        if self.max_update == 0:
            defaults["train_max_update"] = 0.0        # no cap asked for: none in training either
        for name in ("steps", "regulariser", "key_memory", "loc_prior", "max_update", "train_max_update"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, defaults[name])
        if self.back_depth is None:
            object.__setattr__(self, "back_depth", 10 if self.method == "rledit" else 1)
        check_fields(self)
        if not self.modules:
            raise ConfigError("EditorConfig.modules is empty: name at least one module to edit")
        if self.key_memory and self.update_rule != "ridge":
            raise ConfigError("EditorConfig.key_memory applies to the ridge solve; MEND's rank-1 update has none")
        if self.loc_prior and not self.key_memory:
            raise ConfigError("EditorConfig.loc_prior is the starting value of the key memory: it needs "
                              "key_memory > 0")
        if not self.null_space < 1:
            raise ConfigError(f"EditorConfig.null_space: expected a fraction of C0's largest eigenvalue in [0, 1) "
                              f"(0: none), got {self.null_space}")
        if self.null_space and self.update_rule != "ridge":
            raise ConfigError("EditorConfig.null_space projects the ridge solve's update; MEND's rank-1 update has "
                              "none")

    def solve_mode(self) -> str:
        """"looped" or "batched": `solve`, or the backend's default for "auto"."""
        from ..backend import solve
        return solve() if self.solve == "auto" else self.solve

    def hypernet_mode(self) -> str:
        """"unrolled" or "scanned": `hypernet`, or the backend's default for "auto"."""
        from ..backend import hypernet
        return hypernet() if self.hypernet == "auto" else self.hypernet

    def training(self) -> "EditorConfig":
        """The configuration meta-training edits with: train_max_update as the cap."""
        return dataclasses.replace(self, max_update=self.train_max_update)

    @property
    def needs_prior(self) -> bool:
        """Whether a stream needs C0 (the preserved keys' mean k k^T) to start."""
        return bool(self.loc_prior or self.null_space)

    @property
    def prior_slots(self) -> str:
        """Where C0's keys are taken (evaluate.locality_gram): "all" tokens, or the key
        positions ("answer", "subject", "both"). A stored C0 serves an evaluation only
        where this agrees."""
        return "all" if self.prior_positions == "all" else self.key_positions

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
        import jax.numpy as jnp
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


def parse_method(name: str) -> tuple[str, int | None]:
    """'malmen' -> ('malmen', None); 'malmen2' (Method², MSBP plugged in) -> ('malmen', 2)."""
    if name in METHODS:
        return name, None
    base = name.rstrip("0123456789")
    if base in METHODS and base != name:
        return base, int(name[len(base):])
    raise ConfigError(f"unknown method {name!r} (choose from {', '.join(METHODS)}, optionally followed by "
                     "a step count, e.g. malmen2)")


def method_config(method: str, modules, steps: int | None = None, **overrides) -> EditorConfig:
    """The editor configuration of `method` with its defaults (METHOD_DEFAULTS):
    EMSEdit 2 steps with the norm regulariser, MEND / MALMEN / RLEdit 1 step with the KL
    regulariser. `steps` (or a name like 'rledit2') gives "Method²", the same method
    with T steps; `overrides` set any other EditorConfig field."""
    base, named_steps = parse_method(method)
    if steps is not None and named_steps is not None and steps != named_steps:
        raise ConfigError(f"method {method!r} names {named_steps} steps but steps={steps}")
    return EditorConfig(modules=tuple(modules), method=base, steps=named_steps if steps is None else steps,
                        **overrides)


def default_modules(model_cfg, key_positions: str = "answer") -> tuple[str, ...]:
    """The MLP input projections of the last 30% of a LLaMA-style model's layers, at least
    three (21-29 of the embedded 30-layer model: experiments/README.md, "Defaults"), of the
    last six of GPT-2 / GPT-J (the paper's); with keys at the subject (`key_positions`
    "subject"), the same projections in the middle layers where factual recall is
    located (10% to 27% of the depth: 3-8 of the embedded model and of GPT-J, MEMIT's
    range for GPT-J). For a Flax model (--model package.module:factory), the edit paths
    its factory gave `from_nnx` / `from_linen`."""
    from ..models.transformer import builtin
    if not builtin(model_cfg):
        return model_cfg.modules
    n = model_cfg.num_layers
    module = {"llama": "mlp.up_proj", "gpt2": "mlp.c_fc"}.get(model_cfg.family, "mlp.fc_in")
    if key_positions == "subject":
        layers = range(round(0.1 * n), max(round(0.1 * n), round(0.27 * n)) + 1)
    else:
        layers = range(max(0, n - (max(3, round(0.3 * n)) if model_cfg.family == "llama" else 6)), n)
    return tuple(f"{model_cfg.layer_prefix}.{i}.{module}" for i in layers)
