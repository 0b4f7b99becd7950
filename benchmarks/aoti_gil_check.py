"""Does a call into an AOTInductor package release Python's interpreter lock? A second thread counts in a
loop while the main thread (1 torch thread, so a core stays free) runs: nothing, an eager matmul (which
releases the lock), then a small packaged model through AOTICompiledModel.__call__, loader.run and
loader.boxed_run. The counts say how much the other thread ran (docs/benchmarks.md: the packaged decode step
freezes the server's event loop while it runs).

    TORCHINDUCTOR_CACHE_DIR=/tmp/ind python benchmarks/aoti_gil_check.py
"""

from __future__ import annotations

import tempfile
import threading
import time

import torch

SECONDS = 2.0


def counted_while(work) -> int:
    """Iterations a second thread made while `work` was called repeatedly for SECONDS."""
    stop, count = threading.Event(), [0]

    def spin() -> None:
        while not stop.is_set():
            count[0] += 1

    thread = threading.Thread(target=spin)
    thread.start()
    start = time.perf_counter()
    while time.perf_counter() - start < SECONDS:
        work()
    stop.set()
    thread.join()
    return count[0]


def main() -> None:
    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.SiLU(), torch.nn.Linear(4096, 1024)).eval()
    x = torch.randn(64, 1024)
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        exported = torch.export.export(model, (x,))
        package = torch._inductor.aoti_load_package(
            torch._inductor.aoti_compile_and_package(exported, package_path=f"{folder}/m.pt2"))
        weight = torch.randn(4096, 4096)
        print("nothing:", counted_while(lambda: time.sleep(0.01)))
        print("eager matmul:", counted_while(lambda: weight @ weight))
        print("package __call__:", counted_while(lambda: package(x)))
        print("loader.run:", counted_while(lambda: package.loader.run([x])))
        print("loader.boxed_run:", counted_while(lambda: package.loader.boxed_run([x])))


if __name__ == "__main__":
    main()
