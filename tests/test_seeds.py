"""The kernel tests' seeds: unchanged unless BLIPFAST_TEST_SEED is set, and then other
data for every case (tests/seeds.py)."""

import json
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import torch

from seeds import SEED_VARIABLE, case_seed, draw_seed


def test_unset_gives_the_seeds_the_tolerances_were_checked_with(monkeypatch):
    monkeypatch.delenv(SEED_VARIABLE, raising=False)
    assert case_seed("AttentionCase(b2)/torch.float16") == zlib.crc32(
        b"AttentionCase(b2)/torch.float16")
    assert draw_seed(2033) == 2033
    monkeypatch.setenv(SEED_VARIABLE, "")
    assert case_seed("x") == zlib.crc32(b"x") and draw_seed(2033) == 2033


def test_a_set_seed_draws_other_data_reproducibly(monkeypatch):
    names = [f"case{index}/torch.float32" for index in range(50)]
    monkeypatch.setenv(SEED_VARIABLE, "7")
    salted = [case_seed(name) for name in names]
    assert salted == [case_seed(name) for name in names]
    assert all(seed != zlib.crc32(name.encode()) for seed, name in zip(salted, names))
    assert len(set(salted)) == len(names)
    assert draw_seed(2033) != 2033 and draw_seed(2033) != draw_seed(2034)
    monkeypatch.setenv(SEED_VARIABLE, "8")
    assert all(case_seed(name) != seed for name, seed in zip(names, salted))


def test_every_test_module_seeds_its_cases_through_case_seed():
    """A module seeding from zlib.crc32 itself would ignore BLIPFAST_TEST_SEED."""
    tests = Path(__file__).parent
    direct = [path.name for path in sorted(tests.glob("*.py"))
              if path.name not in ("seeds.py", Path(__file__).name)
              and re.search(r"crc32\(", path.read_text())]
    assert direct == []


def _draws_in_a_fresh_process(seed_text):
    """[torch.manual_seed(0) draws, Generator().manual_seed(0) draws, the same after a
    second salt_every_torch_seed call, whether isinstance checks answer as before] in a new
    interpreter after salt_every_torch_seed, with BLIPFAST_TEST_SEED set to ``seed_text``
    (None: unset)."""
    environment = {key: value for key, value in os.environ.items() if key != SEED_VARIABLE}
    if seed_text is not None:
        environment[SEED_VARIABLE] = seed_text
    program = ("import json, torch; from seeds import salt_every_torch_seed; "
               "salt_every_torch_seed(); torch.manual_seed(0); a = torch.randn(3).tolist(); "
               "g = torch.Generator().manual_seed(0); b = torch.randn(3, generator=g).tolist(); "
               "salt_every_torch_seed(); torch.manual_seed(0); c = torch.randn(3).tolist(); "
               "print(json.dumps([a, b, c, isinstance(g, torch._C.Generator) and "
               "isinstance(torch.default_generator, torch.Generator)]))")
    result = subprocess.run([sys.executable, "-c", program], env=environment, check=True,
                            capture_output=True, text=True, cwd=Path(__file__).parent)
    return json.loads(result.stdout)


def test_a_set_seed_salts_torchs_own_seeding_too():
    # torch's own draws at seed 0, whatever this process's seeding
    unsalted = torch.randn(3, generator=torch._C.Generator().manual_seed(0)).tolist()
    plain, plain_generator, _, _ = _draws_in_a_fresh_process(None)
    assert plain == plain_generator == unsalted  # unset: torch's own seeds
    salted, salted_generator, again, is_generator = _draws_in_a_fresh_process("7")
    assert salted != unsalted and salted == salted_generator and is_generator
    assert again == salted  # a second call salts nothing twice
