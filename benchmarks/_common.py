"""Helpers shared by the benchmark suites and the GPU check script (STYLE: "Benchmarks are not tests").

- the environment record every result carries: device name, torch / triton versions, git commit, date;
- timing: a timer that synchronizes CUDA around the timed calls, and the tiny slowdown hook used only
  by the regression demo of benchmarks/README.md;
- bytes moved by an op, GB/s, and the measured copy bandwidth they are compared with;
- random inputs of the three ops (docs/DESIGN.md §3) at any shape, dtype and set of correction terms;
- random-weight DiTs at DiT-XL/2 shapes (GPU) or testbed shapes (CPU), and a driver that repeats a
  forward at a reuse step of a patched model (steps announced with announce_step, as in
  eager_step_cost.py).

``python -m benchmarks._common`` prints the machine id to use in ``--benchmark-storage`` paths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.metadata
import math
import os
import platform
import re
import statistics
import subprocess
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")

# ----------------------------------------------------------------------------------------------
# Environment record
# ----------------------------------------------------------------------------------------------


def git_commit() -> str:
    """Short commit of the working tree, with "+dirty" when tracked files have uncommitted changes."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO_ROOT).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD") or "unknown"
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except OSError:  # no git on the machine
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def device_name(device, threads: int | None = None) -> str:
    """The GPU's name, or "cpu (<processor>, <intra-op threads> threads)"."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads() if threads is None else threads
    return f"cpu ({platform.processor() or platform.machine()}, {threads} thread{'s' * (threads != 1)})"


def environment(device, threads: int | None = None) -> dict:
    """What every result records: device, versions, commit, date (UTC)."""
    device = torch.device(device)
    return {
        "device": device_name(device, threads),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def machine_id(device=None) -> str:
    """A short name of this machine's benchmark device, for per-machine result storage."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu-{platform.machine()}-{os.cpu_count()}cores"
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")


def environment_line(env: dict) -> str:
    return (f"{env['device']} · torch {env['torch']} · triton {env['triton']} · commit {env['commit']} · "
            f"{env['date']}")


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

SLOWDOWN_ENV = "EOC_BENCH_INJECT_SLOWDOWN_MS"


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def synchronized(fn, device):
    """fn followed by a CUDA synchronize, so a timer around it sees the GPU work (no-op on CPU)."""
    if torch.device(device).type != "cuda":
        return fn

    def call():
        result = fn()
        torch.cuda.synchronize(device)
        return result

    return call


def time_call(fn, device, *, repeats: int = 5, warmup: int = 1, inner: int = 1) -> float:
    """Median seconds per call of fn over ``repeats`` samples; each sample synchronizes, runs fn
    ``inner`` times (amortizing the synchronize for microsecond kernels) and synchronizes again."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(max(1, repeats)):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        synchronize(device)
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def inject_slowdown(fn):
    """fn, or — only while $EOC_BENCH_INJECT_SLOWDOWN_MS is set — fn preceded by a sleep of that many
    milliseconds. It exists for one purpose: showing --benchmark-compare-fail catch a slowdown
    (benchmarks/README.md, "Regression tracking"). Never set it for a real measurement."""
    milliseconds = float(os.environ.get(SLOWDOWN_ENV) or 0)
    if milliseconds <= 0:
        return fn

    def slowed():
        time.sleep(milliseconds / 1e3)
        return fn()

    return slowed


# ----------------------------------------------------------------------------------------------
# Bytes and bandwidth
# ----------------------------------------------------------------------------------------------


DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def dtype_name(dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def gbps(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9


def copy_of(nbytes: int, device):
    """fn() copying nbytes / 2 bytes into another buffer: nbytes moved (read + write), the floor of an op
    that must move nbytes, measured at the op's own size (so it sees the same caches)."""
    src = torch.empty(max(1, nbytes // 8), dtype=torch.float32, device=device).uniform_()  # nbytes / 2 bytes
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def copy_bandwidth(device, *, nbytes: int | None = None, repeats: int = 10) -> float:
    """Measured device copy bandwidth in bytes/s (bytes read + bytes written, as GB/s of the ops count
    them): ``dst.copy_(src)`` on a buffer far larger than the GPU's L2 (1 GiB) or 64 MiB on CPU."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = 2**30 if device.type == "cuda" else 2**26
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = time_call(lambda: dst.copy_(src), device, repeats=repeats, warmup=2)
    return 2 * tensor_bytes(src) / seconds


# ----------------------------------------------------------------------------------------------
# Op inputs (docs/DESIGN.md §3)
# ----------------------------------------------------------------------------------------------

#: Correction presets of the kernel benchmarks: which terms are given. "extrapolate" is the FORA +
#: EOC-extrapolate case (Cp only, the case of docs/DESIGN.md §6), "all" every term.
CORRECTIONS = {"plain": (), "extrapolate": ("prev",), "all": ("delta", "prev", "trend")}
ALL_TERMS = ("delta", "prev", "trend")
COEF = {"delta": 0.8, "prev": 0.6, "trend": -0.5}  # alpha, beta, gamma of a term that is on
TERM_INDEX = {"delta": 0, "prev": 1, "trend": 2}
OPS = ("cached_branch", "cached_block", "cached_segment")
#: cached_segment at the shapes of a cached FORA step on CPU (8 rows = 4 images with CFG): the testbed
#: DiT (N = 49, C = 256, 6 blocks) and DiT-S/2 at 256x256 (N = 256, C = 384, 12 blocks).
CPU_SEGMENT_SHAPES = {"testbed": dict(tokens=49, channels=256, blocks=6),
                      "DiT-S/2": dict(tokens=256, channels=384, blocks=12)}
CPU_SEGMENT_BATCH = 8


def cpp_skip_reason(device) -> str | None:
    """Why the "cpp" backend is not timed on device (None: it is)."""
    import eoc_kernels
    from eoc_kernels import cpp

    if torch.device(device).type != "cpu":
        return "the cpp backend runs on CPU tensors only"
    if not eoc_kernels.cpp_available():
        return f"the cpp backend is not built: {cpp.UNAVAILABLE_REASON}"
    return None


@dataclasses.dataclass
class OpCase:
    """One op call: ``fn(*args, **kwargs, backend=...)``, its shapes and the bytes it must move."""

    op: str
    args: tuple
    kwargs: dict
    bytes_moved: int
    shapes: dict

    def run(self, backend=None):
        import eoc_kernels

        return getattr(eoc_kernels, self.op)(*self.args, **self.kwargs, backend=backend)

    def run_reference(self):
        """The eager reference function itself (no validation, no dispatch): what torch.compile gets."""
        from eoc_kernels import reference

        return getattr(reference, self.op)(*self.args, **self.kwargs)


def _coef_tuple(terms, coef_scale=1.0):
    coef = [0.0, 0.0, 0.0]
    for term in terms:
        coef[TERM_INDEX[term]] = COEF[term] * coef_scale
    return tuple(coef)


def _branch_tensors(gen, batch, tokens, channels, heads, terms):
    """Fresh random fp32 tensors of one reused branch, on the generator's device; per-token scales
    spread the judgment scores apart so that a threshold splits the tokens cleanly."""
    device = gen.device

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, device=device)

    def token_scale(rows):
        return 0.1 + 2 * rand(rows, tokens, 1)

    cache = randn(batch, tokens, channels)
    branch = {"gate": randn(batch, channels), "cache": cache, "prev": None, "delta": None, "trend": None}
    if "prev" in terms:
        branch["prev"] = cache - 0.3 * token_scale(batch) * randn(batch, tokens, channels)
    if "delta" in terms:
        branch["delta"] = 0.3 * token_scale(heads) * randn(heads, tokens, channels)
    if "trend" in terms:  # a trend embedding lies in [-1, 1]
        branch["trend"] = (2 * rand(heads, tokens, channels) - 1) * token_scale(heads).clamp(max=1)
    return branch


def make_case(op: str, batch: int, tokens: int, channels: int, dtype, device, *, terms=ALL_TERMS,
              heads: int | None = None, blocks: int = 4, coef_tensor: bool = False, coef_scale: float = 1.0,
              token_threshold: float = 0.0, threshold_tensor: bool = False, seed: int = 0) -> OpCase:
    """Random inputs of ``op`` (cached_branch / cached_block / cached_segment) at [batch, tokens, channels].

    terms: the correction terms given ("delta", "prev", "trend"); coefficients COEF × coef_scale
    (coef_scale 0 gives tensors whose coefficients are zero). heads: H of delta/trend (default 2 when
    the batch is even — CFG halves — else 1). blocks: S of cached_segment; G = 2 when "prev" is a term.
    coef_tensor / threshold_tensor: pass them as float32 device tensors instead of Python numbers
    (cached_segment always takes a tensor coef, or None without terms).
    """
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)  # inputs are drawn on the device
    terms = tuple(terms)
    heads = heads if heads is not None else (2 if batch % 2 == 0 else 1)
    move = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    x = move(torch.randn(batch, tokens, channels, generator=gen, device=device))
    coef = _coef_tuple(terms, coef_scale)
    threshold = torch.tensor([token_threshold], dtype=torch.float32, device=device) if threshold_tensor \
        else token_threshold
    shapes = {"B": batch, "N": tokens, "C": channels, "H": heads if {"delta", "trend"} & set(terms) else None}
    out_bytes = tensor_bytes(x)

    def read_bytes(branch):  # what an ideal kernel reads: a term whose coefficient is zero is skipped
        used = [branch["gate"], branch["cache"]] + [branch[t] for t in ALL_TERMS if coef[TERM_INDEX[t]] != 0.0]
        return tensor_bytes(*used)

    def coef_arg():
        return torch.tensor(coef, dtype=torch.float32, device=device) if coef_tensor else coef

    if op in ("cached_branch", "cached_block"):
        branches = []
        for _ in range(1 if op == "cached_branch" else 2):
            branch = {k: move(v) for k, v in _branch_tensors(gen, batch, tokens, channels, heads, terms).items()}
            branches.append(branch)
        nbytes = tensor_bytes(x) + out_bytes + sum(read_bytes(b) for b in branches)
        if op == "cached_branch":
            (b,) = branches
            return OpCase(op, (x, b["gate"], b["cache"]),
                          dict(prev=b["prev"], delta=b["delta"], trend=b["trend"], coef=coef_arg(),
                               token_threshold=threshold), nbytes, shapes)
        a, m = branches
        return OpCase(op, (x, a["gate"], m["gate"], a["cache"], m["cache"]),
                      dict(prev_attn=a["prev"], prev_mlp=m["prev"], delta_attn=a["delta"], delta_mlp=m["delta"],
                           trend_attn=a["trend"], trend_mlp=m["trend"], coef_attn=coef_arg(), coef_mlp=coef_arg(),
                           token_threshold=threshold), nbytes, shapes)
    if op != "cached_segment":
        raise ValueError(f"unknown op {op!r}; ops: {', '.join(OPS)}")

    generations = 2 if "prev" in terms else 1
    entries = [[_branch_tensors(gen, batch, tokens, channels, heads, terms) for _ in range(2)] for _ in range(blocks)]
    gates = torch.stack([torch.stack([e["gate"] for e in pair], dim=1) for pair in entries], dim=1)  # [B, S, 2, C]
    current = torch.stack([torch.stack([e["cache"] for e in pair]) for pair in entries])  # [S, 2, B, N, C]
    generation = torch.randint(0, generations, (blocks, 2), generator=gen, device=device, dtype=torch.int32)
    if generations == 2:
        previous = torch.stack([torch.stack([e["prev"] for e in pair]) for pair in entries])
        g = generation.long()[..., None, None, None]  # Cc in generation g, Cp in 1 - g
        cache = torch.stack([torch.where(g == 0, current, previous), torch.where(g == 0, previous, current)])
    else:
        cache = current[None]  # [1, S, 2, B, N, C]

    def stacked(term, entries):
        if term not in terms:
            return None
        return torch.stack([torch.stack([e[term] for e in pair]) for pair in entries])  # [S, 2, H, N, C]

    delta, trend = move(stacked("delta", entries)), move(stacked("trend", entries))
    coef_t = torch.tensor(coef, dtype=torch.float32, device=device).expand(blocks, 2, 3).contiguous() if terms else None
    cache, gates = move(cache), move(gates)
    del current, entries
    # Bytes: x, gates, Cc of every entry (+ Cp when beta is on), delta / trend when on, the output.
    cache_read = cache if generations == 2 and coef[1] != 0.0 else cache[0]
    nbytes = tensor_bytes(x, gates, cache_read) + out_bytes
    nbytes += tensor_bytes(delta) if coef[0] != 0.0 else 0
    nbytes += tensor_bytes(trend) if coef[2] != 0.0 else 0
    shapes |= {"S": blocks, "G": generations}
    return OpCase(op, (x, gates, cache, generation),
                  dict(delta=delta, trend=trend, coef=coef_t, token_threshold=threshold), nbytes, shapes)


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------

#: DiT-XL/2 at 256x256 (32x32 latents): N = 256 tokens, C = 1152, 28 blocks (docs/DESIGN.md §6).
XL_SHAPES = dict(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 num_classes=1000, learn_sigma=True)
#: The testbed's architecture (eoc_dit.testbed.train.TrainConfig): 49 tokens, C = 256, 6 blocks.
TESTBED_SHAPES = dict(input_size=28, patch_size=4, in_channels=1, hidden_size=256, depth=6, num_heads=4,
                      num_classes=10, learn_sigma=False)
#: For --dry-run and smoke paths: 16 tokens, C = 32, 3 blocks.
TINY_SHAPES = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=3, num_heads=2,
                   num_classes=4, learn_sigma=False)
TESTBED_CHECKPOINT = os.path.join(REPO_ROOT, "python", "eoc_dit", "testbed", "assets", "testbed_dit.pt")


def describe_shapes(shapes: dict) -> dict:
    tokens = (shapes["input_size"] // shapes["patch_size"]) ** 2
    return {"N": tokens, "C": shapes["hidden_size"], "L": shapes["depth"]}


def cast_model(model, dtype):
    """model in ``dtype``. For fp16/bf16 two hooks bridge the samplers' fp32: the input latents are cast
    to ``dtype``, the output back to fp32."""
    model = model.to(dtype)
    if dtype != torch.float32:
        model.register_forward_pre_hook(lambda module, args: (args[0].to(dtype),) + tuple(args[1:]))
        model.register_forward_hook(lambda module, args, out: out.float())
    return model


def random_dit(shapes: dict, device, dtype=torch.float32, seed: int = 0):
    """A DiT with every weight drawn from N(0, 0.02²), built on ``device`` (the DiT init zeroes adaLN,
    which makes blocks identities: caching is only meaningful on blocks that do something)."""
    from eoc_dit import DiT

    torch.manual_seed(seed)
    with torch.device(device):
        model = DiT(**shapes)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.02)
    return cast_model(model.eval().requires_grad_(False), dtype)


def load_testbed(device, dtype=torch.float32):
    """The trained testbed DiT when its checkpoint is shipped (python/eoc_dit/testbed/assets/), else None."""
    if not os.path.exists(TESTBED_CHECKPOINT):
        return None
    from eoc_dit import testbed

    return cast_model(testbed.load_model(device), dtype)


def sampling_model(device, dtype=torch.float32):
    """(model, description) for the end-to-end benchmarks: DiT-XL/2 shapes with random weights on
    CUDA; on CPU the trained testbed when shipped, else a random DiT of the testbed's shapes."""
    if torch.device(device).type == "cuda":
        return random_dit(XL_SHAPES, device, dtype), "DiT-XL/2 shapes, random weights"
    model = load_testbed(device, dtype)
    if model is not None:
        return model, "testbed (trained)"
    return random_dit(TESTBED_SHAPES, device, dtype), "testbed shapes, random weights"


def class_labels(model, images: int, device, *, cfg: bool = True) -> torch.Tensor:
    """Labels [images] (or [2·images] = [labels; null class] with cfg) of a fixed pattern."""
    labels = torch.arange(images, device=device) * 7 % model.num_classes
    return torch.cat([labels, torch.full_like(labels, model.num_classes)]) if cfg else labels


def full_steps(schedule, num_steps: int, num_blocks: int) -> int:
    """Steps of a run in which at least one branch computes."""
    return int(schedule.mask(num_steps, num_blocks).flatten(1).any(1).sum())


@contextlib.contextmanager
def backend_env(backend: str | None):
    """Sets $EOC_BACKEND (read by every op call; plain caching has no config to carry a backend)."""
    from eoc_kernels.dispatch import ENV_VAR

    saved = os.environ.get(ENV_VAR)
    if backend is not None:
        os.environ[ENV_VAR] = backend
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = saved


@contextlib.contextmanager
def graph_safe_timestep_embedding(model):
    """Makes the DiT's forward capturable in a CUDA graph, bit for bit the same.

    ``TimestepEmbedder.timestep_embedding`` builds its frequency table on the CPU and copies it to the
    device at every call; a blocking host-to-device copy cannot be captured. Inside this block the
    embedder uses the same computation with the table copied to the device once. (The real fix belongs
    in eoc_dit.models: keep the table on the device.)"""
    embedder = model.t_embedder
    tables = {}

    def timestep_embedding(t, dim, max_period=10000):
        key = (dim, max_period, t.device)
        if key not in tables:
            half = dim // 2
            tables[key] = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32,
                                                                         device="cpu") / half).to(device=t.device)
        args = t[:, None].float() * tables[key][None]  # [B, half]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    embedder.timestep_embedding = timestep_embedding  # shadows the staticmethod on this instance only
    try:
        yield tables  # a graph captured inside reads these tensors: keep them alive as long as it
    finally:
        del embedder.timestep_embedding


# ----------------------------------------------------------------------------------------------
# One forward at a reuse step
# ----------------------------------------------------------------------------------------------

#: The cached-step runs: 4 steps; steps 0 and 1 compute every block, steps 2 and 3 reuse every block
#: (source step 1, previous compute step 0, so every preset, extrapolate too, corrects there). Under
#: this schedule a reuse step is what a FORA cached step is: one gate matmul + one cached_segment.
STEP_RUN_LENGTH = 4
COMPUTED_STEPS = 2
STEP_VARIANTS = ("plain", "eoc-extrapolate", "eoc-trend")


def step_schedule(num_blocks: int):
    """The MaskSchedule of the cached-step runs (see STEP_RUN_LENGTH)."""
    from eoc_dit import MaskSchedule

    mask = torch.zeros(STEP_RUN_LENGTH, num_blocks, 2, dtype=torch.bool)
    mask[:COMPUTED_STEPS] = True
    return MaskSchedule(mask)


def step_config(variant: str):
    """(EOCConfig or None, needs a prior) of a cached-step variant."""
    from eoc_dit import EOCConfig

    if variant == "plain":
        return None, False
    mode = variant.removeprefix("eoc-")
    # min_gain=None: no offline judgment, every entry is corrected (the cost being measured).
    return EOCConfig(mode=mode, min_gain=None), mode in ("trend", "delta")


def calibrate_prior(model, sampler, max_gap: int, device):
    """A prior for the trend / delta presets from one uncached run (one label, one seed, CFG 4)."""
    from eoc_dit import calibrate

    return calibrate(model, sampler, [1], [0], cfg_scale=4.0, holdout=0.0, max_gap=max_gap, progress=False,
                     device=device)


def step_prior(model, device):
    """The prior of the cached-step runs (STEP_RUN_LENGTH steps, gaps up to 2)."""
    from eoc_dit import DDIMSampler

    return calibrate_prior(model, DDIMSampler(STEP_RUN_LENGTH), 2, device)


class StepInputs:
    """Model inputs of one step at ``rows`` rows ([images; images] with CFG), in the model's dtype."""

    def __init__(self, model, rows: int, device, dtype):
        from eoc_dit import DDIMSampler

        gen = torch.Generator().manual_seed(0)
        size = model.input_size
        self.x = torch.randn(rows, model.in_channels, size, size, generator=gen).to(device=device, dtype=dtype)
        self.y = class_labels(model, rows // 2, device) if rows % 2 == 0 else \
            torch.arange(rows, device=device) % model.num_classes
        self.timesteps = [torch.full((rows,), t, device=device) for t in DDIMSampler(STEP_RUN_LENGTH).timesteps]

    def full_step(self, model):
        """fn() -> the forward of an unpatched model at the first step (a full step)."""
        @torch.no_grad()
        def forward():
            return model(self.x, self.timesteps[0], self.y)

        return forward


class ReuseStep:
    """Drives a model patched by ``apply_eoc(model, step_schedule(L), ...)``: ``fill`` runs the computing
    steps 0 and 1 (they fill the caches); then each call runs ONE reuse-step forward, alternating
    between steps 2 and 3 (rewinding the handle's step counter before step 2). Alternating makes every
    call compute its gates as a real step does (the handle keeps one step's gates); a reuse step
    writes no cache, so the calls can repeat forever (and be captured in a CUDA graph)."""

    def __init__(self, handle, inputs: StepInputs):
        self.handle, self.model, self.inputs = handle, handle.model, inputs

    @torch.no_grad()  # as the samplers: grad mode would also change how branches write the cache
    def _forward(self, step):
        from eoc_dit.step_protocol import announce_step

        announce_step(self.model, step, STEP_RUN_LENGTH, True)
        return self.model(self.inputs.x, self.inputs.timesteps[step], self.inputs.y)

    def fill(self):
        for step in range(COMPUTED_STEPS):
            self._forward(step)
        return self

    def __call__(self):
        if self.handle.step != COMPUTED_STEPS:  # after the fill or after the last reuse step: rewind
            self.handle.step = COMPUTED_STEPS - 1
        return self._forward(self.handle.step + 1)

    def again(self):
        """The forward of the reuse step run last, once more (e.g. to check a graph replay of it)."""
        step = self.handle.step
        self.handle.step = step - 1
        return self._forward(step)


if __name__ == "__main__":
    print(machine_id())
