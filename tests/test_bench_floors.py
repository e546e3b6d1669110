"""The attention benchmark's floors (bench/attention_benchmark_cases.py): the bytes and
FLOPs each shape must cost, and the table columns built from them (CPU; no timing)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import attention_benchmark_cases as cases  # noqa: E402

RATES = dict(device="test", torch="-", triton="-", cuda="-", date="-",
             bf16_matmul_tflops="500", copy_bandwidth_gbps="2000")


def test_minimum_bytes_counts_each_tensor_once():
    case = cases.AttentionCase("cross", batch=3, heads=2, query_length=5, key_length=7,
                               head_dim=16)
    query, key = 3 * 5 * 2 * 16, 3 * 7 * 2 * 16
    # forward: q and out (query-sized), k and v (key-sized)
    assert case.minimum_bytes("fwd", 2) == 2 * (2 * query + 2 * key)
    # backward adds q, out, grad_out, grad_q and k, v, grad_k, grad_v
    assert case.minimum_bytes("fwd_bwd", 2) == 2 * (6 * query + 6 * key)


@pytest.mark.parametrize("name, bound", [("text_bidir_pad", "bytes"),
                                         ("vit_b16_384_self", "flops")])
def test_floor_is_the_larger_of_flops_and_bytes(name, bound):
    case = cases.CASES_BY_NAME[name]
    flops_ms = case.floating_point_operations("fwd") / 500e12 * 1e3
    bytes_ms = case.minimum_bytes("fwd", 2) / 2000e9 * 1e3
    floor = cases.floor_milliseconds(case, "fwd", RATES)
    assert floor == pytest.approx(max(flops_ms, bytes_ms))
    assert floor == pytest.approx(bytes_ms if bound == "bytes" else flops_ms)


def test_table_has_floor_columns_only_with_measured_rates():
    case = cases.CASES_BY_NAME["vit_g_self"]
    floor = cases.floor_milliseconds(case, "fwd", RATES)
    records = [cases.MeasurementRecord.create("blipfast", case, "fwd", "ok",
                                              milliseconds=2 * floor)]
    with_rates = cases.format_markdown_table(records, RATES).splitlines()
    assert with_rates[0].endswith("| floor ms | blipfast / floor |")
    assert with_rates[2].endswith(f"| {floor:.4f} | 2.00x |")
    without = cases.format_markdown_table(records).splitlines()
    assert "floor" not in without[0] and len(without[2]) < len(with_rates[2])
    assert cases.floor_milliseconds(case, "fwd", None) is None
