"""devices.py: the defaults per device (bfloat16, CUDA graphs) and how a machine is named."""
import io

import pytest
import torch

import devices
import recipe
import train


@pytest.mark.parametrize("bf16_cpu, options, amp", [
    (True, [], {"bn": True, "ln": True, "gn": True}),
    (False, [], {"bn": False, "ln": False, "gn": False}),
    (True, ["--no-amp"], {"bn": False, "ln": False, "gn": False}),
    (False, ["--amp"], {"bn": True, "ln": True, "gn": True})])
def test_amp_by_default_only_where_bfloat16_is_faster(monkeypatch, bf16_cpu, options, amp):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16_cpu)
    args = train.parse_args(["--device", "cpu", *options])
    assert {norm: recipe.run_options(norm, args)["amp"] for norm in amp} == amp


def test_amp_is_off_by_default_on_a_gpu():
    assert not devices.use_amp(None, torch.device("cuda"))


def test_amp_is_off_by_default_where_torch_cannot_tell(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")  # private: may go in a later torch
    assert not devices.use_amp(None, torch.device("cpu"))


@pytest.mark.parametrize("device, options, cuda_graph", [
    ("cuda", [], True), ("cuda", ["--no-cuda-graph"], False), ("cuda", ["--compile"], False),
    ("cpu", [], False), ("cpu", ["--no-cuda-graph"], False)])
def test_cuda_graph_by_default_on_cuda_unless_compiled(monkeypatch, device, options, cuda_graph):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # parsing only: nothing runs
    assert train.parse_args(["--device", device, *options]).cuda_graph is cuda_graph


def test_processor_name_is_the_cpu_model(monkeypatch):
    cpuinfo = "processor\t: 0\nvendor_id\t: Test\nmodel name\t: Test CPU 9000\n"
    monkeypatch.setattr(devices, "open", lambda path: io.StringIO(cpuinfo), raising=False)
    assert devices.processor_name(torch.device("cpu")) == "Test CPU 9000"


def test_processor_name_adds_the_first_cpus_family_and_model(monkeypatch):
    cpu = "processor\t: {}\ncpu family\t: 26\nmodel\t\t: {}\nmodel name\t: AMD EPYC\nflags\t\t: fpu\n"
    cpuinfo = cpu.format(0, 2) + "\n" + cpu.format(1, 17)
    monkeypatch.setattr(devices, "open", lambda path: io.StringIO(cpuinfo), raising=False)
    assert devices.processor_name(torch.device("cpu")) == "AMD EPYC (family 26, model 2)"


def test_processor_name_without_proc_cpuinfo(monkeypatch):
    def missing(path):
        raise FileNotFoundError(path)
    monkeypatch.setattr(devices, "open", missing, raising=False)
    monkeypatch.setattr(devices.platform, "processor", lambda: "")
    assert devices.processor_name(torch.device("cpu")) == "unknown CPU"


@pytest.mark.parametrize("threads, words", [(1, "1 thread"), (2, "2 threads")])
def test_describe_names_processor_and_threads(monkeypatch, threads, words):
    monkeypatch.setattr(devices, "processor_name", lambda device: "Test CPU 9000")
    monkeypatch.setattr(devices.torch, "get_num_threads", lambda: threads)
    assert devices.describe(torch.device("cpu")) == (
        f"cpu (Test CPU 9000), torch {torch.__version__}, {words}")
