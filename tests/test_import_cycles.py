"""No two modules of bench/ or plan/ import each other, directly or through others (a cycle makes a
module that cannot be read, tested or imported on its own; grimp is import-linter's graph)."""

from __future__ import annotations

import itertools

import grimp
import pytest

ACYCLIC_PACKAGES = ("fitserve.bench", "fitserve.plan")


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("fitserve")


@pytest.mark.parametrize("package", ACYCLIC_PACKAGES)
def test_no_import_cycle_inside(graph, package):
    modules = sorted(m for m in graph.find_descendants(package))
    cycles = [(graph.find_shortest_chain(a, b), graph.find_shortest_chain(b, a))
              for a, b in itertools.combinations(modules, 2)
              if graph.find_shortest_chain(a, b) and graph.find_shortest_chain(b, a)]
    assert not cycles, cycles
