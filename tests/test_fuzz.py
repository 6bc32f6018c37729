"""Property-based tests (hypothesis): generated strategies, --set values and dataset files give a
valid result or a clean user error, never a traceback.

CI runs a bounded, derandomized number of examples (profile `ci`). A longer run on demand:
    HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest tests/test_fuzz.py
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contract.errors import DatasetError, StrategyError, UserError
from contract.strategy import FineTunerConfig, Strategy, parse_strategy, resolved_dict
from orchestrator import strategies as strat
from inputs.data.records import FORMATS, read_dataset

# derandomize: CI draws the same examples on every machine, so a failure is reproducible, never flaky.
settings.register_profile("ci", max_examples=10, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SCALARS = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
           | st.sampled_from(["1e400", "-inf", "nan", "3e-4", "auto", "lora", "full", "builtin:tiny-llama-spm", ""]))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=5)


def _section(model) -> st.SearchStrategy:
    """Mappings that use the schema's own key names (plus the odd stranger), so the generator reaches
    the validators instead of stopping at "unknown key"."""
    keys = st.sampled_from(sorted(model.model_fields)) | st.text(max_size=6)
    return st.dictionaries(keys, JSON, max_size=4)


CONFIGS = st.fixed_dictionaries(
    {"base_model": st.fixed_dictionaries({"huggingface_id": st.sampled_from(["builtin:tiny-llama-spm", "org/model", ""])})},
    optional={name: _section(field.annotation) if hasattr(field.annotation, "model_fields") else JSON
              for name, field in FineTunerConfig.model_fields.items() if name != "base_model"},
)


@given(config=CONFIGS, top=st.dictionaries(st.sampled_from(["description", "extra"]), JSON, max_size=1))
def test_strategy_schema_accepts_or_explains(config, top):
    raw = {**top, "fine_tuner": {"config": config}}
    try:
        strategy = strat.validate("fuzz", raw, "fuzz.yaml")
    except StrategyError as exc:
        assert exc.problems and all(": " in p for p in exc.problems), exc.problems
        return
    assert isinstance(strategy, Strategy)
    assert parse_strategy("again", resolved_dict(strategy)) == strategy, "the resolved strategy validates again"


PATHS = st.sampled_from([f"{section}.{key}" for section, field in FineTunerConfig.model_fields.items()
                         if hasattr(field.annotation, "model_fields") for key in field.annotation.model_fields]
                        + list(FineTunerConfig.model_fields)) | st.text(max_size=20)
VALUES = st.text(max_size=20) | st.sampled_from(["inf", "1e300", "true", "[1, 2", "{a: b}", "-0", "null", "~", "0x10"])


@given(assignments=st.lists(st.tuples(PATHS, VALUES).map("=".join) | st.text(max_size=20), max_size=3))
def test_set_overrides_apply_or_explain(assignments):
    entry, _ = strat.get("tiny_demo")
    try:
        raw, _ = strat.apply_overrides(entry.raw, tuple(assignments))
        strat.validate("tiny_demo", raw, "fuzz with --set")
    except UserError as exc:
        assert str(exc).strip()


ROW = st.fixed_dictionaries({}, optional={k: JSON | st.text(max_size=10) for k in (
    "instruction", "input", "output", "messages", "conversations", "prompt", "completion", "text", "role")})
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "bot"]),
                                           "content": st.text(max_size=8) | JSON}), max_size=4)
ROWS = st.lists(ROW | MESSAGES.map(lambda m: {"messages": m}) | JSON, max_size=5)


def _read(suffix: str, data: bytes, fmt: str = "auto"):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(data)
        try:
            rows = read_dataset(path, fmt)
        except DatasetError as exc:
            assert str(exc).strip()
            return
        assert rows and all(r.where and (r.messages or r.text) for r in rows)


@given(rows=ROWS, junk=st.lists(st.binary(max_size=20), max_size=2), fmt=st.sampled_from(["auto", *FORMATS]))
def test_jsonl_reader_reads_or_explains(rows, junk, fmt):
    lines = [json.dumps(r).encode() for r in rows] + junk
    _read(".jsonl", b"\n".join(lines), fmt)


@given(rows=ROWS)
def test_json_reader_reads_or_explains(rows):
    _read(".json", json.dumps(rows).encode())


@settings(max_examples=max(2, settings().max_examples // 5))  # each CSV goes through the datasets library
@given(text=st.lists(st.lists(st.text(max_size=8) | st.sampled_from(["instruction", "output", '"', "\r"]),
                              min_size=1, max_size=3), max_size=4),
       junk=st.binary(max_size=8))
def test_csv_and_parquet_readers_read_or_explain(text, junk):
    body = "\n".join(",".join(row) for row in text).encode("utf-8", "surrogatepass") + junk
    _read(".csv", body)
    _read(".parquet", body)
