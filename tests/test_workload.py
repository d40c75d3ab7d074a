"""Workload rules, the parameter-count estimate and input checking (no network, no Redis)."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import REGISTRY

from app import settings as settings_mod
from app.errors import Unsatisfiable, ValidationFailed
from app.workload import (
    WorkloadAnalyzer,
    estimate_memory,
    parse_parameter_count,
    quantization_in_name,
)


@pytest.fixture
def analyzer():
    return WorkloadAnalyzer(settings_mod.defaults())


def fleet(gpus, memory_mb):
    return lambda: {"max_gpus_per_node": gpus, "max_gpu_memory_mb": memory_mb}


# (workload_type, workload_data, expected subset) -- the original's documented cases first.
RULES = [
    # training: model_size table, batch thresholds, multi_gpu; hints only raise the count
    (
        "training",
        {},
        {
            "required_gpus": 1,
            "min_memory_mb": 8192,
            "priority": 5,
            "max_utilization": 90.0,
            "estimated_duration_seconds": 4 * 3600.0,
        },
    ),
    ("training", {"model_size": "small"}, {"required_gpus": 1, "min_memory_mb": 4096}),
    ("training", {"model_size": "medium"}, {"required_gpus": 2, "min_memory_mb": 8192}),
    ("training", {"model_size": "large"}, {"required_gpus": 4, "min_memory_mb": 16384}),
    ("training", {"model_size": "xlarge"}, {"required_gpus": 8, "min_memory_mb": 32768}),
    ("training", {"model_size": "XLarge"}, {"required_gpus": 8, "min_memory_mb": 32768}),
    ("training", {"batch_size": 256}, {"required_gpus": 4, "min_memory_mb": 8192}),
    ("training", {"batch_size": 256.0}, {"required_gpus": 4, "min_memory_mb": 8192}),
    ("training", {"batch_size": 64}, {"required_gpus": 1}),
    ("training", {"batch_size": 65}, {"required_gpus": 2}),
    ("training", {"batch_size": 128}, {"required_gpus": 2}),
    ("training", {"batch_size": 129}, {"required_gpus": 4}),
    ("training", {"multi_gpu": True}, {"required_gpus": 2}),
    ("training", {"multi_gpu": False}, {"required_gpus": 1}),
    # the original's bug: batch 128 lowered "large" from 4 GPUs to 2
    (
        "training",
        {"model_size": "large", "batch_size": 128},
        {"required_gpus": 4, "min_memory_mb": 16384},
    ),
    (
        "training",
        {"model_size": "xlarge", "batch_size": 256, "multi_gpu": True},
        {"required_gpus": 8},
    ),
    (
        "training",
        {"model_size": "small", "batch_size": 200},
        {"required_gpus": 4, "min_memory_mb": 4096},
    ),
    # inference: model families, model_size caps/sets, dedicated, concurrency
    (
        "inference",
        {},
        {
            "required_gpus": 1,
            "min_memory_mb": 4096,
            "priority": 7,
            "max_utilization": 80.0,
            "estimated_duration_seconds": 3600.0,
        },
    ),
    (
        "inference",
        {"model_name": "gemma-7b"},
        {"required_gpus": 1, "min_memory_mb": 16384, "priority": 8, "max_utilization": 85.0},
    ),
    ("inference", {"model_name": "google/Gemma-7B-it"}, {"min_memory_mb": 16384, "priority": 8}),
    (
        "inference",
        {"model_name": "gemma-2b"},
        {"required_gpus": 1, "min_memory_mb": 4096, "priority": 7},
    ),
    (
        "inference",
        {"model_name": "vaultgemma-1b"},
        {"required_gpus": 1, "min_memory_mb": 2048, "priority": 6, "max_utilization": 75.0},
    ),
    ("inference", {"model_name": "vault-gemma"}, {"min_memory_mb": 2048, "priority": 6}),
    # whole-word family match: "gemma-2b" inside "vaultgemma-2b" is not the gemma-2b family
    ("inference", {"model_name": "vaultgemma-2b"}, {"min_memory_mb": 2048, "priority": 6}),
    ("inference", {"model_name": "supergemma-7b"}, {"min_memory_mb": 16022, "priority": 7}),
    (
        "inference",
        {"model_name": "phi-3.5-mini"},
        {"required_gpus": 1, "min_memory_mb": 4096, "priority": 7},
    ),
    ("inference", {"model_name": "granite-4.0-tiny"}, {"min_memory_mb": 4096, "priority": 7}),
    (
        "inference",
        {"concurrent_requests": 25},
        {"required_gpus": 4, "min_memory_mb": 4096, "priority": 7},
    ),
    ("inference", {"concurrent_requests": 10}, {"required_gpus": 1}),
    ("inference", {"concurrent_requests": 11}, {"required_gpus": 2}),
    ("inference", {"concurrent_requests": 20.0}, {"required_gpus": 2}),
    ("inference", {"dedicated": True}, {"required_gpus": 1, "min_memory_mb": 8192, "priority": 8}),
    (
        "inference",
        {"dedicated": True, "model_name": "gemma-7b"},
        {"min_memory_mb": 16384, "priority": 8},
    ),
    ("inference", {"model_size": "small"}, {"min_memory_mb": 2048}),
    ("inference", {"model_size": "medium"}, {"min_memory_mb": 4096}),
    ("inference", {"model_size": "large"}, {"min_memory_mb": 8192}),
    ("inference", {"model_size": "xlarge"}, {"min_memory_mb": 16384}),
    ("inference", {"model_name": "gemma-7b", "model_size": "medium"}, {"min_memory_mb": 4096}),
    ("inference", {"model_name": "vaultgemma-1b", "model_size": "medium"}, {"min_memory_mb": 2048}),
    ("inference", {"workflow_priority": 9}, {"priority": 9}),
    ("inference", {"workflow_priority": 9.0, "model_name": "gemma-7b"}, {"priority": 9}),
    # embedding / ocr / graph_processing
    (
        "embedding",
        {},
        {"required_gpus": 1, "min_memory_mb": 2048, "priority": 6, "max_utilization": 85.0},
    ),
    ("embedding", {"batch_size": 16}, {"required_gpus": 1}),
    ("embedding", {"batch_size": 64}, {"required_gpus": 2}),
    (
        "ocr",
        {},
        {"required_gpus": 1, "min_memory_mb": 4096, "priority": 6, "max_utilization": 80.0},
    ),
    ("ocr", {"image_count": 50}, {"required_gpus": 1}),
    ("ocr", {"image_count": 200}, {"required_gpus": 2}),
    (
        "graph_processing",
        {},
        {"required_gpus": 1, "min_memory_mb": 4096, "priority": 5, "max_utilization": 75.0},
    ),
    ("graph_processing", {"node_count": 100_000}, {"min_memory_mb": 4096}),
    ("graph_processing", {"node_count": 2_000_000}, {"min_memory_mb": 8192, "required_gpus": 1}),
    # generic, and the original's generic overrides
    (
        "generic",
        {},
        {"required_gpus": 1, "min_memory_mb": 4096, "priority": 5, "max_utilization": 80.0},
    ),
    (
        "generic",
        {"required_gpus": 2, "min_memory_mb": 8192, "priority": 7},
        {"required_gpus": 2, "min_memory_mb": 8192, "priority": 7},
    ),
    (
        "generic",
        {"required_gpus": 2.0, "min_memory_mb": 8192.0, "priority": 7.0},
        {"required_gpus": 2, "min_memory_mb": 8192, "priority": 7},
    ),
]


@pytest.mark.parametrize("wtype,data,expected", RULES, ids=[f"{t}-{d}" for t, d, _ in RULES])
def test_rules(analyzer, wtype, data, expected):
    result = analyzer.analyze(wtype, data)
    assert {k: result[k] for k in expected} == expected
    assert result["decided_by"] == "rules"
    assert result["workload_type"] == wtype


@pytest.mark.parametrize("wtype", settings_mod.WORKLOAD_TYPES)
def test_explicit_values_override_the_rules_for_every_type(analyzer, wtype):
    data = {
        "model_size": "large",
        "batch_size": 500,
        "concurrent_requests": 50,
        "image_count": 500,
        "node_count": 5_000_000,
        "dedicated": True,
        "required_gpus": 3,
        "min_memory_mb": 1000,
        "max_memory_mb": 20000,
        "priority": 2,
        "max_utilization": 55,
        "estimated_duration_seconds": 90,
    }
    if wtype not in ("training", "inference"):
        data.pop("model_size")
    result = analyzer.analyze(wtype, data)
    assert (
        result["required_gpus"],
        result["min_memory_mb"],
        result["max_memory_mb"],
        result["priority"],
        result["max_utilization"],
        result["estimated_duration_seconds"],
    ) == (3, 1000, 20000, 2, 55.0, 90.0)
    assert "explicit" in result["reasoning"]


def test_explicit_priority_beats_workflow_priority(analyzer):
    assert analyzer.analyze("inference", {"workflow_priority": 9, "priority": 4})["priority"] == 4
    assert analyzer.analyze("training", {"workflow_priority": 2})["priority"] == 2


def test_result_shape_and_workflow_fields(analyzer):
    result = analyzer.analyze(
        "generic", {"workflow_id": "wf-1", "workflow_dependencies": ["a", "b", "a"]}
    )
    assert set(result) == {
        "workload_type",
        "required_gpus",
        "min_memory_mb",
        "max_memory_mb",
        "priority",
        "max_utilization",
        "estimated_duration_seconds",
        "reasoning",
        "decided_by",
        "depends_on",
        "workflow_id",
        "estimate",
        "warnings",
    }
    assert result["workflow_id"] == "wf-1"
    assert result["depends_on"] == ["a", "b"]
    assert result["max_memory_mb"] == 0
    assert result["estimate"] is None
    assert result["warnings"] == []
    assert analyzer.analyze("generic", None)["depends_on"] == []


def test_thresholds_and_tables_come_from_the_config():
    settings = settings_mod.defaults().replace(
        workload_defaults={
            "training": {
                "large_batch_size": 8,
                "xlarge_batch_size": 16,
                "default_priority": 3,
                "model_sizes": {
                    "tiny": {"gpus": 1, "memory_mb": 1024},
                    "huge": {"gpus": 6, "memory_mb": 40000},
                },
            },
            "inference": {
                "high_concurrency": 2,
                "very_high_concurrency": 3,
                "model_families": [{"match": ["mybot"], "memory_mb": 12000, "priority": 9}],
            },
            "embedding": {"large_batch_size": 4},
            "ocr": {"large_batch_size": 10, "default_memory_mb": 5000},
            "graph_processing": {"large_batch_size": 10},
            "generic": {"default_gpus": 2, "estimated_duration": "5m"},
        }
    )
    a = WorkloadAnalyzer(settings)
    assert a.analyze("training", {"batch_size": 9})["required_gpus"] == 2
    assert a.analyze("training", {"batch_size": 17})["required_gpus"] == 4
    assert a.analyze("training", {})["priority"] == 3
    huge = a.analyze("training", {"model_size": "huge"})
    assert (huge["required_gpus"], huge["min_memory_mb"]) == (6, 40000)
    with pytest.raises(ValidationFailed) as exc:
        a.analyze("training", {"model_size": "large"})  # no longer in the table
    assert "huge" in exc.value.details["workload_data.model_size"][0]
    assert a.analyze("inference", {"concurrent_requests": 3})["required_gpus"] == 2
    assert a.analyze("inference", {"concurrent_requests": 4})["required_gpus"] == 4
    bot = a.analyze("inference", {"model_name": "acme/mybot-v2"})
    assert (bot["min_memory_mb"], bot["priority"]) == (12000, 9)
    # gemma-7b is no longer a listed family: the parameter-count estimate decides
    assert a.analyze("inference", {"model_name": "gemma-7b"})["min_memory_mb"] == 16022
    assert a.analyze("embedding", {"batch_size": 5})["required_gpus"] == 2
    assert a.analyze("ocr", {"image_count": 11})["required_gpus"] == 2
    assert a.analyze("ocr", {})["min_memory_mb"] == 5000
    assert a.analyze("graph_processing", {"node_count": 11})["min_memory_mb"] == 8192
    generic = a.analyze("generic", {})
    assert (generic["required_gpus"], generic["estimated_duration_seconds"]) == (2, 300.0)


@pytest.mark.parametrize(
    "bad_config",
    [
        {"training": {"model_sizes": {"small": {"gpus": 0, "memory_mb": 1}}}},
        {"training": {"model_sizes": {"small": {"gpus": 1}}}},
        {"inference": {"model_families": [{"match": [], "memory_mb": 1, "priority": 1}]}},
        {"inference": {"model_families": [{"match": "x", "memory_mb": 1, "priority": 11}]}},
        {
            "inference": {
                "model_families": [{"match": "x", "memory_mb": 1, "priority": 1, "colour": "red"}]
            }
        },
    ],
)
def test_bad_tables_are_config_errors(bad_config):
    with pytest.raises(settings_mod.ConfigError):
        settings_mod.defaults().replace(workload_defaults=bad_config)


# --------------------------------------------------------------------------- input checking


@pytest.mark.parametrize(
    "field,value",
    [
        ("batch_size", "64"),
        ("batch_size", -1),
        ("batch_size", True),
        ("batch_size", [64]),
        ("concurrent_requests", "25"),
        ("image_count", -5),
        ("node_count", "2M"),
        ("required_gpus", 0),
        ("required_gpus", 65),
        ("required_gpus", 2.5),
        ("required_gpus", "2"),
        ("min_memory_mb", -1),
        ("min_memory_mb", "8GB"),
        ("max_memory_mb", -1),
        ("priority", 0),
        ("priority", 11),
        ("priority", "high"),
        ("workflow_priority", 0),
        ("workflow_priority", "9"),
        ("max_utilization", 101),
        ("max_utilization", "80"),
        ("estimated_duration_seconds", 0),
        ("parameters_billions", 0),
        ("parameters_billions", "7"),
        ("parameters_billions", 1e9),
        ("model_size", "huge"),
        ("model_size", 3),
        ("model_name", 7),
        ("model_name", ""),
        ("dtype", "fp64"),
        ("quantization", "int3"),
        ("dedicated", "true"),
        ("multi_gpu", 1),
        ("workflow_id", 42),
        ("workflow_dependencies", "req-1"),
        ("batch_size", float("nan")),
        ("priority", float("inf")),
    ],
)
def test_wrong_types_and_ranges_name_the_field(analyzer, field, value):
    wtype = "training" if field in ("model_size", "multi_gpu") else "inference"
    with pytest.raises(ValidationFailed) as exc:
        analyzer.analyze(wtype, {field: value})
    assert exc.value.status == 422
    assert f"workload_data.{field}" in exc.value.details
    assert f"workload_data.{field}" in exc.value.message


def test_every_bad_field_is_reported_at_once(analyzer):
    with pytest.raises(ValidationFailed) as exc:
        analyzer.analyze(
            "inference", {"batch_size": "x", "priority": 0, "workflow_dependencies": ["ok", 3]}
        )
    assert set(exc.value.details) == {
        "workload_data.batch_size",
        "workload_data.priority",
        "workload_data.workflow_dependencies[1]",
    }


def test_unknown_workload_type_lists_the_valid_ones(analyzer):
    with pytest.raises(ValidationFailed) as exc:
        analyzer.analyze("rendering", {})
    assert "training" in exc.value.details["workload_type"][0]
    assert "graph_processing" in exc.value.details["workload_type"][0]


def test_workload_data_must_be_an_object(analyzer):
    with pytest.raises(ValidationFailed) as exc:
        analyzer.analyze("generic", ["required_gpus", 2])
    assert "workload_data" in exc.value.details


def test_max_memory_below_min_memory_is_rejected(analyzer):
    with pytest.raises(ValidationFailed) as exc:
        analyzer.analyze("generic", {"min_memory_mb": 8000, "max_memory_mb": 4000})
    assert "workload_data.max_memory_mb" in exc.value.details
    with pytest.raises(ValidationFailed) as exc:  # below what the rules require
        analyzer.analyze("inference", {"model_name": "gemma-7b", "max_memory_mb": 8000})
    assert "16384" in exc.value.details["workload_data.max_memory_mb"][0]


def test_unknown_keys_are_ignored(analyzer):
    assert analyzer.analyze("generic", {"colour": "blue", "nested": {"a": 1}})["required_gpus"] == 1


def test_analysis_does_not_modify_its_input(analyzer):
    data = {"model_name": "llama-3-70b", "workflow_dependencies": ["a"], "batch_size": 256}
    snapshot = repr(data)
    analyzer.analyze("training", data)
    assert repr(data) == snapshot


# --------------------------------------------------------------------------- names and 7b


@pytest.mark.parametrize(
    "name,billions",
    [
        ("llama-3-70b", 70),
        ("Qwen2.5-14B-Instruct", 14),
        ("mistral-7b-v0.3", 7),
        ("meta-llama/Meta-Llama-3.1-405B-Instruct", 405),
        ("deepseek-r1-distill-qwen-1.5b", 1.5),
        ("model-17b-chat", 17),
        ("Mixtral-8x7B-v0.1", 56),
        ("gemma-2-9b-it", 9),
        ("my7bot", None),
        ("phi-3.5-mini", None),
        ("bert-base-uncased", None),
        ("gpt2", None),
        ("7bridges", None),
        ("v0.7b", None),
        ("qwen2.5", None),
    ],
)
def test_parameter_count_is_a_whole_word(name, billions):
    got = parse_parameter_count(name)
    assert (None if got is None else float(got)) == billions


@pytest.mark.parametrize("name", ["model-17b-chat", "my7bot", "super7b-ish", "gemma-27b"])
def test_a_7b_substring_is_not_a_7b_model(analyzer, name):
    result = analyzer.analyze("inference", {"model_name": name})
    assert result["min_memory_mb"] != 16384 and result["priority"] == 7
    if name == "model-17b-chat":  # estimated as 17B: 17e9 x 2 x 1.2 / 2^20
        assert result["min_memory_mb"] == 38910
        assert result["estimate"]["parameters_billions"] == 17


@pytest.mark.parametrize(
    "name,quant",
    [
        ("Qwen2.5-14B-Instruct-AWQ", "awq"),
        ("llama-2-13b-chat-gptq", "gptq"),
        ("model-7b-int8", "int8"),
        ("model-7b-fp8", "fp8"),
        ("awqward-7b", None),
        ("llama-3-8b", None),
    ],
)
def test_quantization_named_in_the_model(name, quant):
    assert quantization_in_name(name) == quant


# --------------------------------------------------------------------------- the estimate


@pytest.mark.parametrize(
    "billions,nbytes,overhead,total,gpus,per_gpu",
    [
        # 70e9 x 2 x 1.2 = 168e9 B = 160217.29 MiB -> 160218; > 81559, so 2 GPUs of 80109
        (70, 2, 1.2, 160218, 2, 80109),
        (14, 2, 1.2, 32044, 1, 32044),  # 33.6e9 B = 32043.46 MiB
        (7, 2, 1.2, 16022, 1, 16022),  # 16.8e9 B = 16021.73 MiB
        (7, 4, 1.2, 32044, 1, 32044),  # fp32
        (70, 1, 1.2, 80109, 1, 80109),  # int8: just fits one 80 GB GPU
        (70, 0.5, 1.2, 40055, 1, 40055),  # int4: 42e9 B = 40054.32 MiB
        (1, 2, 1.0, 1908, 1, 1908),  # 2e9 B = 1907.35 MiB
        (120, 2, 1.2, 274659, 4, 68665),  # needs 3.37 -> 4 GPUs (power of two)
        (0.5, 2, 1.0, 954, 1, 954),
    ],
)
def test_estimate_arithmetic(billions, nbytes, overhead, total, gpus, per_gpu):
    est = estimate_memory(billions, nbytes, overhead, max_gpus_per_node=8, max_gpu_memory_mb=81559)
    assert (est.total_memory_mb, est.gpus, est.memory_per_gpu_mb, est.fits) == (
        total,
        gpus,
        per_gpu,
        True,
    )


def test_estimate_power_of_two_only_when_the_node_has_that_many():
    # 30e9 x 2 x 1.2 = 72e9 B = 68664.55 MiB -> 68665; 24000 MB GPUs: 3 needed
    est = estimate_memory(30, 2, 1.2, max_gpus_per_node=6, max_gpu_memory_mb=24000)
    assert (est.gpus, est.memory_per_gpu_mb, est.fits) == (4, 17167, True)
    est = estimate_memory(
        30, 2, 1.2, max_gpus_per_node=6, max_gpu_memory_mb=24000, power_of_two=False
    )
    assert (est.gpus, est.memory_per_gpu_mb, est.fits) == (3, 22889, True)
    # 60B: 137330 MB needs 6; 8 would not fit a 6-GPU node, so 6 it is
    est = estimate_memory(60, 2, 1.2, max_gpus_per_node=6, max_gpu_memory_mb=24000)
    assert (est.gpus, est.memory_per_gpu_mb, est.fits) == (6, 22889, True)
    # 70B: 160218 MB needs 7 > 6
    est = estimate_memory(70, 2, 1.2, max_gpus_per_node=6, max_gpu_memory_mb=24000)
    assert (est.gpus, est.fits) == (7, False)


def test_estimate_that_no_node_holds():
    est = estimate_memory(405, 2, 1.2, max_gpus_per_node=8, max_gpu_memory_mb=81559)
    assert est.total_memory_mb == 926972 and not est.fits


@pytest.mark.parametrize(
    "data,total,gpus,per_gpu,precision",
    [
        ({"model_name": "llama-3-70b"}, 160218, 2, 80109, "fp16"),
        ({"model_name": "Qwen2.5-14B-Instruct"}, 32044, 1, 32044, "fp16"),
        ({"model_name": "mistral-7b-v0.3"}, 16022, 1, 16022, "fp16"),
        ({"model_name": "mistral-7b-v0.3", "dtype": "fp32"}, 32044, 1, 32044, "fp32"),
        ({"model_name": "mistral-7b-v0.3", "dtype": "bf16"}, 16022, 1, 16022, "bf16"),
        ({"model_name": "llama-3-70b", "quantization": "int4"}, 40055, 1, 40055, "int4"),
        (
            {"model_name": "llama-3-70b", "dtype": "fp16", "quantization": "int8"},
            80109,
            1,
            80109,
            "int8",
        ),
        ({"model_name": "Qwen2.5-14B-Instruct-AWQ"}, 8011, 1, 8011, "awq"),
        (
            {"model_name": "Qwen2.5-14B-Instruct-AWQ", "quantization": "none"},
            32044,
            1,
            32044,
            "fp16",
        ),
        ({"parameters_billions": 13}, 29755, 1, 29755, "fp16"),
        ({"parameters_billions": 13, "model_name": "llama-3-70b"}, 29755, 1, 29755, "fp16"),
    ],
)
def test_inference_uses_the_estimate(analyzer, data, total, gpus, per_gpu, precision):
    result = analyzer.analyze("inference", data)
    est = result["estimate"]
    assert (est["total_memory_mb"], est["gpus"], est["memory_per_gpu_mb"], est["precision"]) == (
        total,
        gpus,
        per_gpu,
        precision,
    )
    assert (result["required_gpus"], result["min_memory_mb"]) == (gpus, max(per_gpu, 4096))
    assert f"= {total} MB" in result["reasoning"]


def test_known_family_keeps_the_originals_figures_but_parameters_billions_still_counts(analyzer):
    assert analyzer.analyze("inference", {"model_name": "gemma-2b"})["estimate"] is None
    result = analyzer.analyze("inference", {"model_name": "gemma-2b", "parameters_billions": 2.5})
    assert result["estimate"]["total_memory_mb"] == 5723  # 2.5e9 x 2 x 1.2 / 2^20 = 5722.05
    assert result["min_memory_mb"] == 5723


def test_default_dtype_and_overheads_come_from_the_config():
    settings = settings_mod.defaults().replace(
        memory_estimate={
            "overhead_factor": 1.5,
            "default_dtype": "int8",
            "training_overhead_factor": 2.0,
        }
    )
    a = WorkloadAnalyzer(settings)
    assert (
        a.analyze("inference", {"parameters_billions": 10})["estimate"]["total_memory_mb"] == 14306
    )  # 10e9 x 1 x 1.5 / 2^20 = 14305.11
    assert (
        a.analyze("training", {"parameters_billions": 10})["estimate"]["total_memory_mb"] == 19074
    )  # 10e9 x 1 x 2.0 / 2^20 = 19073.49


def test_training_estimate_counts_optimizer_state(analyzer):
    result = analyzer.analyze("training", {"model_name": "llama-3-8b", "model_size": "small"})
    assert result["estimate"]["overhead_factor"] == 4.0
    # 8e9 x 2 x 4 = 64e9 B = 61035.16 MiB -> one 80 GB GPU
    assert (result["required_gpus"], result["min_memory_mb"]) == (1, 61036)
    big = analyzer.analyze("training", {"model_name": "llama-3-70b"})
    assert (big["required_gpus"], big["min_memory_mb"]) == (8, 66758)  # 534058 / 8


def test_estimate_spreads_over_the_fleets_gpus():
    a = WorkloadAnalyzer(settings_mod.defaults(), fleet_limits=fleet(8, 24576))
    result = a.analyze("inference", {"model_name": "Qwen2.5-14B-Instruct"})
    # 32044 MB > 24576: 2 GPUs of 16022
    assert (result["required_gpus"], result["min_memory_mb"]) == (2, 16022)
    assert "spread over 2 GPUs" in result["reasoning"]


def test_model_too_big_for_any_node_is_unsatisfiable(analyzer):
    with pytest.raises(Unsatisfiable) as exc:
        analyzer.analyze("inference", {"model_name": "Meta-Llama-3.1-405B-Instruct"})
    assert exc.value.status == 422
    assert exc.value.details["field"] == "workload_data.model_name"
    assert "int4" in exc.value.message
    ok = analyzer.analyze(
        "inference", {"model_name": "Meta-Llama-3.1-405B-Instruct", "quantization": "int4"}
    )
    assert (ok["required_gpus"], ok["min_memory_mb"]) == (4, 57936)  # 231743 MB / 4


def test_explicit_gpu_count_spreads_the_estimate(analyzer):
    result = analyzer.analyze("inference", {"model_name": "llama-3-70b", "required_gpus": 4})
    assert (result["required_gpus"], result["min_memory_mb"]) == (4, 40055)  # 160218 / 4
    result = analyzer.analyze(
        "inference", {"model_name": "llama-3-70b", "required_gpus": 4, "min_memory_mb": 30000}
    )
    assert (result["required_gpus"], result["min_memory_mb"]) == (4, 30000)


def test_hint_values_are_clamped_to_the_fleet_explicit_values_are_not():
    a = WorkloadAnalyzer(settings_mod.defaults(), fleet_limits=fleet(4, 24576))
    result = a.analyze("training", {"model_size": "xlarge"})
    assert (result["required_gpus"], result["min_memory_mb"]) == (4, 24576)
    assert "clamped" in result["reasoning"]
    result = a.analyze("training", {"required_gpus": 8, "min_memory_mb": 40000})
    assert (result["required_gpus"], result["min_memory_mb"]) == (8, 40000)


@pytest.mark.parametrize(
    "limits", [lambda: {}, lambda: {"max_gpus_per_node": 0, "max_gpu_memory_mb": 0}, lambda: 1 / 0]
)
def test_unknown_fleet_falls_back_to_eight_80gb_gpus(limits):
    a = WorkloadAnalyzer(settings_mod.defaults(), fleet_limits=limits)
    assert a.limits() == (8, 81559)
    assert a.analyze("inference", {"model_name": "llama-3-70b"})["required_gpus"] == 2


def test_an_unreachable_fleet_view_is_one_log_line_not_a_traceback(caplog):
    """With Redis down every allocate and /gpu/workload logged a 40-line traceback of the
    fleet read (the client already gets its 503); one line per analysis names the error."""
    import redis

    def down():
        raise redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:1.")

    a = WorkloadAnalyzer(settings_mod.defaults(), fleet_limits=down)
    with caplog.at_level(logging.WARNING, logger="app.workload"):
        assert a.limits() == (8, 81559)
    (record,) = [r for r in caplog.records if r.name == "app.workload"]
    assert record.exc_info is None
    assert "ConnectionError: Error 111 connecting" in record.getMessage()
    assert "\n" not in record.getMessage()


def test_decisions_metric_counts_rules(analyzer):
    def value():
        return (
            REGISTRY.get_sample_value(
                "gpu_orchestrator_workload_decisions_total", {"source": "rules"}
            )
            or 0.0
        )

    before = value()
    analyzer.analyze("generic", {})
    analyzer.analyze("ocr", {})
    assert value() == before + 2
    with pytest.raises(ValidationFailed):
        analyzer.analyze("ocr", {"image_count": "many"})
    assert value() == before + 2


# --------------------------------------------------------------------------- the memo


def _rules_count() -> float:
    return (
        REGISTRY.get_sample_value("gpu_orchestrator_workload_decisions_total", {"source": "rules"})
        or 0.0
    )


def test_a_workload_seen_before_gets_the_same_analysis_and_still_counts():
    import json

    a = WorkloadAnalyzer(settings_mod.defaults(), fleet_limits=fleet(8, 81559))
    data = {"model_size": "small", "gpu_count": 2}
    key = json.dumps(data)
    before = _rules_count()
    first = a.analyze("inference", data, memo_key=key, top_level=("required_gpus",))
    fresh = WorkloadAnalyzer(settings_mod.defaults(), fleet_limits=fleet(8, 81559)).analyze(
        "inference", data, top_level=("required_gpus",)
    )
    assert first == fresh and first["warnings"]
    first["warnings"].append("changed by a reader")
    first["required_gpus"] = 99
    second = a.analyze("inference", data, memo_key=key, top_level=("required_gpus",))
    assert second == fresh  # a reader's change to one answer does not reach the next
    assert _rules_count() - before == 3
    assert len(a._memo) == 1


def test_the_memo_follows_the_fleet_the_type_and_the_key_order():
    import json

    limits = {"max_gpus_per_node": 8, "max_gpu_memory_mb": 81559}
    a = WorkloadAnalyzer(settings_mod.defaults(), fleet_limits=lambda: dict(limits))
    data = {"model_name": "llama-13b"}
    key = json.dumps(data)
    big = a.analyze("inference", data, memo_key=key)
    limits["max_gpu_memory_mb"] = 24576
    small = a.analyze("inference", data, memo_key=key)
    assert small["required_gpus"] > big["required_gpus"]
    assert small == WorkloadAnalyzer(settings_mod.defaults(), fleet_limits=fleet(8, 24576)).analyze(
        "inference", data
    )
    assert a.analyze("training", data, memo_key=key)["workload_type"] == "training"
    one, two = {"zz": 1, "aa": 2}, {"aa": 2, "zz": 1}
    w1 = a.analyze("generic", one, memo_key=json.dumps(one))["warnings"]
    w2 = a.analyze("generic", two, memo_key=json.dumps(two))["warnings"]
    assert w1 == list(reversed(w2)) and len(w1) == 2


def test_the_memo_is_bounded_and_skips_long_keys_and_errors():
    import json

    from app import workload

    a = WorkloadAnalyzer(settings_mod.defaults())
    for i in range(workload.MEMO_SIZE + 10):
        data = {"batch_size": i + 1}
        a.analyze("inference", data, memo_key=json.dumps(data))
        assert len(a._memo) <= workload.MEMO_SIZE
    a._memo.clear()
    long = {"note": "x" * workload.MEMO_KEY_MAX}
    a.analyze("generic", long, memo_key=json.dumps(long))
    bad = {"batch_size": -1}
    for _ in range(2):
        with pytest.raises(ValidationFailed):
            a.analyze("inference", bad, memo_key=json.dumps(bad))
    assert a._memo == {}


def test_no_memo_with_an_advisor_or_a_graph_service():
    import json

    class Advisor:
        calls = 0

        def advise(self, *args, **kwargs):
            Advisor.calls += 1
            return None

    a = WorkloadAnalyzer(settings_mod.defaults(), advisor=Advisor())
    data = {"model_size": "small"}
    for _ in range(3):
        a.analyze("inference", data, memo_key=json.dumps(data))
    assert Advisor.calls == 3 and a._memo == {}
    b = WorkloadAnalyzer(settings_mod.defaults(), workflow=object())
    b.analyze("inference", data, memo_key=json.dumps(data))
    assert b._memo == {}
