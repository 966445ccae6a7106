"""The package's shape (docs/explanations/layout.md): subpackages by subject, arrows one way, small files, old
paths kept."""

import importlib
import subprocess
import sys
import warnings

import pytest

from import_graph import cycles, folder, folder_graph, read_modules, top_level_modules

MODULES = read_modules()


def test_few_top_level_modules_and_no_import_cycles():
    assert len(top_level_modules(MODULES)) <= 12, top_level_modules(MODULES)
    assert cycles({m.name: m.imports for m in MODULES.values()}) == []
    assert cycles(folder_graph(MODULES)) == []


def test_no_file_over_300_lines_and_no_function_over_60():
    assert [(m.name, m.lines) for m in MODULES.values() if m.lines > 300] == []
    assert [(m.name, f, n) for m in MODULES.values() for f, n in m.long_functions] == []


def test_every_import_inside_a_function_says_why():
    unexplained = [(m.name, line, stmt) for m in MODULES.values() for line, stmt, reason in m.local_imports
                   if not reason]
    assert unexplained == []


@pytest.mark.parametrize("lower, higher", [("lorakit.layers", ("adapters", "variants", "train", "serve", "export")),
                                           ("lorakit.variants", ("adapters", "train", "serve", "export")),
                                           ("lorakit.serve", ("train", "studio")), ("lorakit.train", ("serve", "studio")),
                                           ("lorakit.kernels", ("layers", "adapters"))])
def test_arrows_point_down(lower, higher):
    reached = {folder(t).split(".")[-1] for m in MODULES.values() if folder(m.name) == lower for t in m.imports}
    assert reached.isdisjoint(higher), f"{lower} imports {sorted(reached & set(higher))}"


def test_old_module_paths_are_the_moved_modules_with_a_warning():
    from lorakit.moved_modules import MOVED

    for old, new in MOVED.items():
        sys.modules.pop(old, None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = importlib.import_module(old)
        assert module is importlib.import_module(new)
        assert module.__spec__.name == new  # the module keeps its own identity
        assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught), old
    from lorakit.train import TrainConfig, load_train_config, train  # documented deep paths
    from lorakit.train_config import TrainConfig as OldTrainConfig

    assert OldTrainConfig is TrainConfig and callable(train) and callable(load_train_config)


def test_help_and_import_lorakit_do_not_load_torch():
    code = ("import sys, lorakit, lorakit.cli; lorakit.cli.build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
