"""The CPU decode step as an AOTInductor package (`--cpu-compile aot`): compiled once, loaded in seconds.

`--cpu-compile decode` (runner/cpu_compile.py) compiles the decode step with torch.compile at every
start-up: inductor's cache keeps the generated code, but dynamo's tracing runs again each time (12.5 s
for the embedded model on 2 cores, 71 s from an empty cache). Here the same function (`decode_forward`)
is exported once with torch.export, the KV cache a list of inputs that it writes in place, and compiled
ahead of time by AOTInductor into a package (a shared library) under the inductor cache dir. A later
start-up loads the package and points it at the model's own weights (`load_constants`, user-managed:
the package holds no copy), with no tracing: about 2 s for the embedded model.

Where there is no package yet, a server does not wait for it: it serves eager steps at once while a
child process (spawned, at a lower priority) builds the engine again and, in it, the package; the
first decode step after the child has finished loads the package (a 2 s pause, once) and the packaged
steps take over. The child holds a second copy of the model while it builds, and a KV cache of one
longest request (the package's KV blocks are symbolic: it serves any cache size). Where
nothing serves in the meantime (the child itself, or a runner given no builder) the build runs in place.
A child that fails leaves a marker beside the package's path, and later start-ups stay eager without
building again until it is deleted.

One export serves every decode batch: the rows (1 to max_num_seqs) and the block-table width (2 to the
longest context's blocks) are symbolic. The package is keyed by what its code depends on: fitserve's
source, torch's version, the CPU's capability, the model's class, parameter names, shapes and dtypes,
the KV cache's block shape and dtype, the block size and the two bounds. A package is built once (the
embedded model: about 55 s to export and compile on 2 cores). Prefill and mixed steps stay eager, as do
models with several KV cache groups.

A `--quantization gguf` model's 4-bit layers call torch's int4 CPU matmul (kernels/cpu_int4.py). Inductor's
lowering of that op makes its group size a tensor constant of the package's own, which a package whose
constants are the model's weights is never given; the build lowers it as a plain fallback op instead
(runner/cpu_compile.py `lower_int4_mm_as_fallback`: AOTInductor calls it through its proxy executor, a few
microseconds a call).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import multiprocessing
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import fitserve
from fitserve.core.outputs import ScheduledRequest
from fitserve.runner.cpu_compile import decode_forward, decode_inputs, is_decode_batch, lower_int4_mm_as_fallback
from fitserve.runner.input_batch import PlaceholderFill, chunks_on_blocks
from fitserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

PACKAGE_FORMAT = 2  # bump when what a package takes or returns changes
MIN_MAX_TABLE_WIDTH = 3  # export needs the width's range to hold more than its minimum (2)
# The KV cache's blocks are symbolic too: a package serves any cache size, so the builder child needs only
# a small cache (startup.build_cpu_package_in_child)
MIN_KV_BLOCKS, MAX_KV_BLOCKS = 8, 1 << 24
BUILD_HERE_ENV = "FITSERVE_AOT_BUILD_HERE"  # set in the builder child: build in place, do not spawn again


def cpp_compiler() -> str | None:
    """The C++ compiler AOTInductor would build a package with, or None where there is none (a slim
    container image): `--cpu-compile auto` then stays eager instead of starting a build that must fail."""
    # inductor (its import or the search) writes its default cache dir (/tmp/torchinductor_USER) into
    # $TORCHINDUCTOR_CACHE_DIR where it is unset; config.inductor_cache_dir, read after this, and the builder
    # child, which inherits the environment, would then put the package there, not in ~/.cache/fitserve
    cache_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:
        from torch._inductor import cpp_builder

        return cpp_builder.get_cpp_compiler()
    except Exception:  # inductor's own "no valid C++ compiler" error, whatever its class in this torch
        return None
    finally:
        if cache_dir is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)


class DecodeStep(nn.Module):
    """What is exported: decode_forward with the KV cache as an input, bound to the layers at each call."""

    def __init__(self, model: nn.Module, block_size: int) -> None:
        super().__init__()
        self.model = model
        self.block_size = block_size

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                seq_lens: torch.Tensor, block_tables: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        self.model.bind_kv_cache(list(kv_caches))
        return decode_forward(self.model, self.block_size, input_ids, positions, slot_mapping, seq_lens, block_tables)


def source_digest() -> str:
    """A digest of every Python file of the installed fitserve: a changed layer or kernel is a new package."""
    digest = hashlib.sha256()
    root = Path(fitserve.__file__).parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


class CpuDecodePackage:
    """The packaged decode step of one model; `run` replaces the eager forward and logits of a decode batch."""

    def __init__(self, model: nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int,
                 max_num_seqs: int, max_model_len: int, cache_dir: str,
                 build_elsewhere: Callable[[int], multiprocessing.process.BaseProcess] | None = None) -> None:
        """`build_elsewhere(kv_blocks)` starts a process that builds the package, with a KV cache of that many
        blocks, while this one serves eager steps (startup.build_cpu_package_in_child); None: warm_up builds
        in place."""
        self.step = DecodeStep(model, block_size).eval()
        self.build_elsewhere = build_elsewhere if not os.environ.get(BUILD_HERE_ENV) else None
        self.builder: multiprocessing.process.BaseProcess | None = None  # the child building, until adopted
        self._builder_started_s = 0.0
        self.kv_caches = kv_caches
        self.max_num_seqs = max_num_seqs
        self.max_table_width = max(MIN_MAX_TABLE_WIDTH, -(-max_model_len // block_size))
        self.path = Path(cache_dir) / "fitserve-aot" / f"decode-{self.key()}.pt2"
        self.failed_marker = self.path.with_suffix(".failed")  # a builder child failed: not tried again
        self.built = False  # whether warm_up built the package (else it loaded one)
        self._package = None

    @property
    def builder_kv_blocks(self) -> int:
        """The builder child's KV cache: one longest request's blocks (the package takes any number)."""
        return max(MIN_KV_BLOCKS, self.max_table_width + 1)

    def key(self) -> str:
        model = self.step.model
        described = {
            "format": PACKAGE_FORMAT, "fitserve": fitserve.__version__, "source": source_digest(),
            "torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
            "model": type(model).__qualname__,
            "parameters": [(name, tuple(t.shape), str(t.dtype)) for name, t in model.state_dict().items()],
            "kv": [(tuple(k.shape[1:]), str(k.dtype)) for k, _ in self.kv_caches],  # any number of blocks
            "block_size": self.step.block_size, "max_num_seqs": self.max_num_seqs,
            "max_table_width": self.max_table_width,
        }
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:24]

    def can_run(self, scheduled: tuple[ScheduledRequest, ...], num_kv_groups: int) -> bool:
        """A decode batch, once the package is loaded; adopts a builder child's package when the child has
        finished."""
        if self._package is None and self.builder is not None and not self.builder.is_alive():
            self._adopt_built()
        return self._package is not None and is_decode_batch(scheduled, num_kv_groups)

    @torch.inference_mode()
    def run(self, scheduled: tuple[ScheduledRequest, ...], fill: PlaceholderFill | None = None) -> torch.Tensor:
        """Logits [len(scheduled), vocab] float32 of these decode requests, by the packaged step."""
        inputs = decode_inputs(scheduled, self.step.block_size)
        if fill is not None:
            fill.apply(inputs[0])
        return self._package(*inputs, self.kv_caches)

    def warm_up(self) -> float:
        """Load the package; where there is none, start its builder child, or build it here first (without a
        builder); returns the seconds it took."""
        start_s = time.monotonic()
        if not self.path.exists() and self.build_elsewhere is not None:
            if self.failed_marker.exists():
                logger.warning("An earlier build of the CPU decode step's package failed (%s); decode steps stay "
                               "eager. Delete that file to build it again.", self.failed_marker)
            else:
                logger.info("Serving eager decode steps while a child process builds the CPU decode step's "
                            "AOTInductor package (--cpu-compile aot) in %s: a minute or more, once for this model, "
                            "shapes and fitserve", self.path)
                self.builder, self._builder_started_s = self.build_elsewhere(self.builder_kv_blocks), start_s
            return time.monotonic() - start_s
        if not self.path.exists():
            logger.info("Building the CPU decode step's AOTInductor package (--cpu-compile aot) in %s: a minute or "
                        "more, once for this model, shapes and fitserve", self.path)
            self._build()
            self.built = True
        self._load()
        elapsed_s = time.monotonic() - start_s
        logger.info("CPU decode step %s (--cpu-compile aot) in %.1f s", "built and loaded" if self.built else "loaded",
                    elapsed_s)
        return elapsed_s

    def _adopt_built(self) -> None:
        """The builder child has exited: load its package, or stay eager if it left none."""
        builder, self.builder = self.builder, None
        if builder.exitcode != 0 or not self.path.exists():
            logger.warning("The CPU decode step's package was not built (its builder process exited with %s); decode "
                           "steps stay eager, and later start-ups do not build it again until %s is deleted",
                           builder.exitcode, self.failed_marker)
            try:
                self.failed_marker.parent.mkdir(parents=True, exist_ok=True)
                self.failed_marker.write_text(f"builder exit code {builder.exitcode} at {time.ctime()}\n")
            except OSError as error:  # an unwritable cache dir (the likely failure itself): the next start tries again
                logger.warning("Could not leave the failed-build marker %s: %s", self.failed_marker, error)
            return
        start_s = time.monotonic()
        self._load()
        self.built = True
        logger.info("Switched to the packaged CPU decode step (--cpu-compile aot) %.0f s after start-up; loaded in "
                    "%.1f s", start_s - self._builder_started_s, time.monotonic() - start_s)

    def _load(self) -> None:
        self._package = torch._inductor.aoti_load_package(str(self.path))
        fqns = self._package.get_constant_fqns()
        weights = {fqn: functools.reduce(getattr, fqn.split("."), self.step) for fqn in fqns}
        self._package.load_constants(weights, check_full_update=True, user_managed=True)

    def _build(self) -> None:
        example = decode_inputs(self._example_batch(), self.step.block_size)
        rows = torch.export.Dim("rows", min=1, max=self.max_num_seqs)
        width = torch.export.Dim("table_width", min=2, max=self.max_table_width)
        blocks = torch.export.Dim("kv_blocks", min=MIN_KV_BLOCKS, max=MAX_KV_BLOCKS)
        dynamic = ({0: rows}, {0: rows}, {0: rows}, {0: rows}, {0: rows, 1: width},
                   [({0: blocks}, {0: blocks})] * len(self.kv_caches))
        try:
            with torch.no_grad(), warnings.catch_warnings():
                # the layers' cache attributes are set from the inputs on purpose (DecodeStep.forward)
                warnings.filterwarnings("ignore", message="The tensor attributes .* were assigned during export")
                exported = torch.export.export(self.step, (*example, self.kv_caches), dynamic_shapes=dynamic,
                                               strict=False)
        finally:  # tracing bound its fake tensors to the layers: give them the real cache back
            self.step.model.bind_kv_cache(self.kv_caches)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f"{self.path.stem}.{os.getpid()}.partial.pt2")
        lower_int4_mm_as_fallback()
        torch._inductor.aoti_compile_and_package(
            exported, package_path=str(partial), inductor_configs={"aot_inductor.package_constants_in_so": False})
        os.replace(partial, self.path)  # whole or absent: another process never loads half a package

    def _example_batch(self) -> tuple[ScheduledRequest, ...]:
        """Three made-up decode requests of two blocks each (export traces them on fake tensors)."""
        return chunks_on_blocks([((0,), self.step.block_size + 1)] * 3, "export", self.step.block_size,
                                SamplingParams())
