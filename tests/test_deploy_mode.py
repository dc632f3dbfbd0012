"""Deployment-aware students (``QuantConfig(deploy="onnx")``): residual blocks quantize both add inputs and their
output with one step per tensor, the rewritten forward keeps the folded teacher's function, an unknown residual block
is refused, saved students reload identically (training and packed form), SQAKD trains them, and their ONNX export
runs in onnxruntime as a fully integer graph (every Conv a QLinearConv, every residual Add a QLinearAdd) that agrees
with the fake-quant student on this CPU (x86 without VNNI: 7-bit weight codes); timm's tf_* models (TF 'same'
padding) export with every conv as a QLinearConv (the head conv's output is quantized before the global pool),
random-init and the real EfficientNet-Lite0; the student in evaluation computes each integer conv with the engine's
arithmetic, so the graphs agree with it to float rounding."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sqakd_hf import QuantConfig, calibrate, export_onnx, load_quantized, quant_layers, quantize_model, save_quantized
from sqakd_hf.deploy_mode import tensor_quantizers
from sqakd_hf.errors import InputError
from sqakd_hf.injection import named_quantizers
from sqakd_hf.quantizers import FullPrecision

from effnet_fixtures import effnet_safetensors, effnet_teacher, photo_crops  # noqa: F401  (pytest fixtures)
from test_folding import _with_real_looking_stats

timm = pytest.importorskip("timm")

DEPLOY = QuantConfig(deploy="onnx", weight_bits=8, act_bits=8, modules_to_not_convert=[])


def teacher_of(arch: str, num_classes: int = 10) -> nn.Module:
    """A seeded random-init timm model with non-trivial, well-conditioned BatchNorms (positive gammas, variances >= 0.5:
    one-code differences do not grow from layer to layer, as in a trained net), in eval mode."""
    torch.manual_seed(0)
    model = _with_real_looking_stats(timm.create_model(arch, num_classes=num_classes))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.clamp_(min=0.5)
            m.weight.data.abs_()
    return model


@pytest.fixture(scope="module")
def crops() -> torch.Tensor:
    return photo_crops(24, seed=0, size=64)


def _student(arch: str, crops: torch.Tensor, config: QuantConfig = DEPLOY) -> nn.Module:
    teacher = teacher_of(arch)
    student = quantize_model(copy.deepcopy(teacher), config)
    calibrate(student, [crops[:8], crops[8:16]])
    return student.eval()


@pytest.mark.parametrize("arch", ["resnet10t", "resnet14t"])  # BasicBlock / Bottleneck, both with avg-pool downsample
def test_blocks_quantize_add_inputs_and_outputs_once(arch, crops):
    teacher = teacher_of(arch)
    student = quantize_model(copy.deepcopy(teacher), DEPLOY)
    blocks = [student.layer1[0], student.layer2[0], student.layer3[0], student.layer4[0]]
    # the first block quantizes its input (the stem's max-pool output); later ones read the previous block's output
    assert hasattr(blocks[0], "input_quantizer") and not any(hasattr(b, "input_quantizer") for b in blocks[1:])
    for b in blocks:
        assert b.residual_quantizer.bits == 8 and b.output_quantizer.bits == 8
        assert isinstance(b.conv1.input_quantizer, FullPrecision)  # reads the block input through its one step
    assert all(hasattr(b, "shortcut_quantizer") for b in blocks[1:])  # downsample branches
    # avg-pool downsample: the conv reads the pooled tensor, so it keeps its own input quantizer
    assert not isinstance(blocks[1].downsample[1].input_quantizer, FullPrecision)
    assert {layer.weight_quantizer.bits for _, layer in quant_layers(student)} == {7}  # reduce range
    assert not any(isinstance(m, nn.BatchNorm2d) for m in student.modules())
    # with every quantizer bypassed the rewritten blocks compute the (folded) teacher's function
    for _, q in named_quantizers(student):
        q.bypass = True
    x = crops[:4]
    with torch.no_grad():
        ref = teacher(x)
        assert torch.allclose(student.eval()(x), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


def test_shared_steps_get_gradients_from_every_reader(crops):
    """layer1.0's output is read by layer2.0's conv1 (main branch) and its avg-pool downsample: both read the one
    tensor on the one grid, and the step's gradient is the sum of what each reader sends back."""
    student = _student("resnet10t", crops).train()
    shared, block = student.layer1[0].output_quantizer, student.layer2[0]
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, key=key: seen.__setitem__(key, a[0]))
             for key, m in (("main", block.conv1), ("shortcut", block.downsample[0]))]
    logits = student(crops[:4])
    for h in hooks:
        h.remove()
    assert seen["main"] is seen["shortcut"]
    codes = seen["main"] / shared.scale
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    # d(step) through each reader alone, then through both: additive (no reader's gradient is lost); in float64, as
    # the step's gradient is a difference of two large dot products
    student.double()
    x = student.layer1(student.maxpool(student.act1(student.bn1(student.conv1(crops[:4].double())))))
    main = block.residual_quantizer(block.bn2(block.conv2(block.act1(block.bn1(block.conv1(x))))))
    short = block.shortcut_quantizer(block.downsample(x))
    g_main, = torch.autograd.grad(main.square().sum(), shared.scale, retain_graph=True)
    g_short, = torch.autograd.grad(short.square().sum(), shared.scale, retain_graph=True)
    g_both, = torch.autograd.grad(main.square().sum() + short.square().sum(), shared.scale)
    assert float(g_main.abs()) > 0 and float(g_short.abs()) > 0
    assert torch.allclose(g_both, g_main + g_short, rtol=1e-9)
    logits.square().mean().backward()
    assert all(q.scale.grad is not None and bool(torch.isfinite(q.scale.grad).all())
               for _, q in named_quantizers(student) if q.role == "act" and q.bits < 32)


def test_unknown_residual_block_is_refused():
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return x + self.conv(x)

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Residual(), nn.Flatten(), nn.Linear(8 * 16, 4))
    with pytest.raises(InputError, match=r"1 \(Residual\) adds two tensors .* deploy rewrite does not know"):
        quantize_model(model, QuantConfig(deploy="onnx", weight_bits=8, act_bits=8))
    from test_hf_quantizer import FAMILIES  # transformers ViT: its layers do not trace, their adds cannot be found

    with pytest.raises(InputError, match=r"vit\.layers\.0 \(ViTLayer\) does not trace with torch\.fx"):
        quantize_model(FAMILIES["vit"].build(), QuantConfig(deploy="onnx", weight_bits=8, act_bits=8))
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8).eval(), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 196, 4))
    quantize_model(plain, QuantConfig(deploy="onnx", weight_bits=8, act_bits=8, modules_to_not_convert=[]))  # no add


@pytest.mark.parametrize("arch", ["resnet10t", "efficientnet_lite0"])
def test_integer_convs_add_their_bias_on_the_int32_grid(arch, crops):
    """Every conv whose output the integer graph quantizes computes as an integer conv (all of them here; Lite0's head
    conv through the input quantizer of its global pool): its bias is rounded to the int32 grid ``s_in * s_w``
    (with s_in the step of the quantizer that made its input, the block's where the conv reads a block input), in
    training too with a straight-through gradient; in evaluation it computes with the engine's arithmetic, the same
    function as the float fake-quant path up to rounding."""
    from sqakd_hf.deploy_mode import integer_bias

    student = _student(arch, crops)
    convs = {n: m for n, m in student.named_modules() if isinstance(m, nn.Conv2d)}
    integer = {n for n, m in convs.items() if type(m).__name__.startswith("Integer")}
    assert integer == set(convs)
    if arch == "efficientnet_lite0":
        assert student.global_pool.pool.input_quantizer.bits == 8
        assert student.conv_head.deploy_output_source == (student.global_pool.pool, "input_quantizer")
    for name in integer:
        conv = convs[name]
        owner, attr = conv.deploy_input_source
        s_in = getattr(owner, attr).scale.detach()
        codes = integer_bias(conv).detach() / (s_in * conv.weight_quantizer.scale.detach().reshape(-1))
        assert torch.allclose(codes, codes.round(), atol=1e-3), name
        assert not torch.equal(integer_bias(conv), conv.bias), name  # it did round
    with torch.no_grad():
        engine = student(crops[:8])
        student.train()
        plain = student(crops[:8])
    assert not torch.equal(engine, plain) and float((engine - plain).norm() / plain.norm()) < 0.1
    student(crops[:4]).square().mean().backward()
    assert all(convs[n].bias.grad is not None and bool(torch.isfinite(convs[n].bias.grad).all()) for n in integer)


def test_residual_adds_match_the_integer_graph_bit_for_bit(tmp_path, crops):
    """Every residual add's output codes in onnxruntime (QLinearAdd: fused multiply-adds in float32 on the uint8 codes)
    equal the student's in evaluation, which computes each integer conv and add with the engine's arithmetic. minmax
    steps come from observed maxima, so two grids often share a step and an add lands exactly halfway between two
    codes; the student's float sum rounded such a code differently on these 24 crops (random-init Lite0, 64 px)."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    x = crops
    config = QuantConfig(method="minmax", deploy="onnx", weight_bits=8, act_bits=8, modules_to_not_convert=[])
    student = _student("efficientnet_lite0", x, config)
    path = export_onnx(student, tmp_path / "m.onnx", x[:1])
    _ort_ops(path, tmp_path)
    model = onnx.load(str(tmp_path / "optimized.onnx"))
    adds = [n for n in model.graph.node if n.op_type == "QLinearAdd"]
    model.graph.output.extend(helper.make_tensor_value_info(n.output[0], TensorProto.UINT8, None) for n in adds)
    onnx.save(model, str(tmp_path / "adds.onnx"))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(tmp_path / "adds.onnx"), options, providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": x.numpy()})))
    blocks = {n.rpartition(".")[0]: owner for n, owner, _, _ in tensor_quantizers(student)
              if hasattr(owner, "residual_quantizer")}
    seen = {}
    hooks = [b.register_forward_hook(lambda m, a, out, k=k: seen.__setitem__(k, out)) for k, b in blocks.items()]
    with torch.no_grad():
        student(x)
    for h in hooks:
        h.remove()
    assert len(adds) == 9
    for node in adds:
        name = [p for p in node.name.split("/") if "." in p][-1]  # "/blocks/blocks.1/blocks.1.1/Add"
        q = blocks[name].output_quantizer
        codes = got[node.output[0]].astype(np.int64)
        if codes.shape[1] != seen[name].shape[1]:  # channels-last in onnxruntime's graph
            codes = codes.transpose(0, 3, 1, 2)
        zero = 128 if q.qmin < 0 else 0
        ours = torch.round(seen[name] / q.scale).numpy().astype(np.int64) + zero
        assert np.array_equal(codes, ours), (name, int((codes != ours).sum()))


def test_dead_channel_bias_fits_int32_and_the_graph_matches(tmp_path, crops):
    """A channel whose folded weights are nearly zero (a BatchNorm gamma near 0, as in trained EfficientNets) gets a
    tiny weight step, so its bias code ``b / (s_in * s_w)`` overflows int32: onnxruntime saturated it to -2**31 and
    its zero-point correction wrapped that around, a wrong constant channel feeding the next conv. The export raises
    that channel's weight step until the code fits (its weights move by less than half the new step, its output by
    far less than a code), and the student in evaluation does the same: the graph computes the student's function."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from sqakd_hf.deploy_mode import BIAS_CODE_LIMIT

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.8, 1.2)
            bn.bias.uniform_(-0.1, 0.1)
        model[1].weight[0], model[1].bias[0] = 1e-7, -5.0  # dead: relu(-5 + ~0) = 0
    student = quantize_model(model.eval(), DEPLOY)
    calibrate(student, [crops[:8], crops[8:16]])
    student.eval()
    conv = student[0]
    s_in, s_w = float(conv.input_quantizer.scale), float(conv.weight_quantizer.scale.reshape(-1)[0])
    assert abs(float(conv.bias[0])) / (s_in * s_w) > 2 ** 31  # would overflow
    path = export_onnx(student, tmp_path / "m.onnx", crops[:1])
    assert _ort_ops(path, tmp_path).get("QLinearConv") == 2  # the second through the pool's input quantizer
    graph = onnx.load(str(tmp_path / "optimized.onnx")).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    codes = [inits[n.input[8]].astype(np.int64) for n in graph.node if n.op_type == "QLinearConv"]
    assert codes
    assert max(int(np.abs(c).max()) for c in codes) <= BIAS_CODE_LIMIT
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": crops.numpy()})[0]
    with torch.no_grad():
        ref = student(crops).numpy()
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max(), (np.abs(out - ref).max(), np.abs(ref).max())


def test_config_fields():
    cfg = QuantConfig(deploy="onnx")
    assert cfg.act_granularity == "per_tensor" and cfg.fold_bn
    assert QuantConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    assert QuantConfig(deploy="onnx-vnni", weight_bits=8).bits_for("x")["weight_bits"] == 8
    assert QuantConfig(deploy="onnx", weight_bits=4).bits_for("x")["weight_bits"] == 4
    for bad in (dict(deploy="tensorrt"), dict(deploy="onnx", act_granularity="per_token"),
                dict(deploy="onnx", method="ewgs")):
        with pytest.raises(ValueError, match="deploy"):
            QuantConfig(**bad)


@pytest.mark.parametrize("packed", [False, True])
def test_deploy_student_reloads_identically(tmp_path, crops, packed):
    student = _student("resnet10t", crops)
    save_quantized(student, tmp_path / "s", packed=packed, fp_dtype=torch.float32)
    again = load_quantized(tmp_path / "s").eval()
    assert again.sqakd_config.deploy == "onnx"
    assert isinstance(again.layer2[0].conv1.input_quantizer, FullPrecision)
    with torch.no_grad():
        assert torch.equal(again(crops), student(crops))


def test_sqakd_trains_a_deploy_student(tmp_path, crops):
    import datasets

    from sqakd_hf import SQAKDTrainer, SQAKDTrainingArguments

    teacher = teacher_of("resnet10t")
    student = quantize_model(copy.deepcopy(teacher).train(), DEPLOY)
    args = SQAKDTrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, save_strategy="no",
                                  disable_tqdm=True, per_device_train_batch_size=8, max_steps=3, learning_rate=1e-3,
                                  quantizer_learning_rate=1e-2, calibration_batches=1, seed=0)
    data = datasets.Dataset.from_dict({"pixel_values": crops.numpy()}).with_format("torch")
    calibrate(student, [crops[:8]])  # the trainer then skips its own calibration
    block_steps = {n: q.scale for n, _, _, q in tensor_quantizers(student)}
    before = {n: float(p.detach()) for n, p in block_steps.items()}
    trainer = SQAKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    groups = trainer.quantizer_param_groups(student)
    assert {id(p) for p in block_steps.values()} <= {id(p) for p in groups[-1]["params"]}
    trainer.train()
    moved = [n for n, p in block_steps.items() if float(p) != before[n]]
    assert len(moved) == len(block_steps), sorted(set(block_steps) - set(moved))
    assert np.isfinite(trainer.state.log_history[-1]["train_loss"])


def _ort_ops(path: Path, tmp_path: Path) -> dict:
    from sqakd_hf.export.onnx_integer import optimized_op_counts

    return optimized_op_counts(path, tmp_path / "optimized.onnx")


@pytest.mark.parametrize("arch", ["resnet10t", "resnet14t"])
def test_onnx_export_is_a_fully_integer_graph_matching_the_student(arch, tmp_path, crops):
    """After onnxruntime's optimizer every Conv is a QLinearConv and every residual Add a QLinearAdd; on this CPU the
    int8 graph computes the student's function: the student in evaluation computes each integer conv with the
    engine's arithmetic (int32 bias, exact accumulation, one float32 requantization), so the logits agree to float
    rounding (measured 1e-6 of max |logit|; the float fake-quant path differs by 0.03 of 2 through one-code flips)
    and every crop has the same top-1."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    student = _student(arch, crops)
    path = export_onnx(student, tmp_path / "model.onnx", crops[:1])
    ops = _ort_ops(path, tmp_path)
    convs = sum(isinstance(m, nn.Conv2d) for m in student.modules())
    assert ops.get("QLinearConv") == convs and not ops.get("Conv") and not ops.get("FusedConv"), ops
    # the only float Add is the classifier's bias behind its integer matmul
    assert ops.get("QLinearAdd") == 4 and ops.get("Add") == ops.get("MatMulIntegerToFloat") == 1, ops
    assert not ops.get("Sum"), ops
    graph = onnx.load(str(path)).graph  # weight codes stay in 7 bits (no u8 x s8 saturation without VNNI)
    codes = [onnx.numpy_helper.to_array(i) for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert codes and max(int(np.abs(c.astype(np.int16)).max()) for c in codes) <= 64
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"input": crops.numpy()})[0]
    with torch.no_grad():
        ref = student(crops).numpy()
    err = float(np.abs(out - ref).max())
    assert err <= 1e-4 * np.abs(ref).max(), (err, np.abs(ref).max())
    assert (out.argmax(1) == ref.argmax(1)).all()


@pytest.mark.parametrize("packed", [False, True])
def test_transformers_timm_wrapper_from_full_precision_folder_and_reload(tmp_path, packed):
    """AutoModelForImageClassification.from_pretrained(fp_dir, quantization_config=QuantConfig(deploy="onnx")) folds
    and rewrites the blocks after the full-precision weights are in (nothing missing or unexpected); the saved student
    reloads to identical logits in both forms."""
    from test_hf_quantizer import FAMILIES, load_student, logits, save_teacher

    family = FAMILIES["timm"]
    save_teacher(family, tmp_path / "fp")
    student = load_student(family, tmp_path / "fp", QuantConfig(deploy="onnx", weight_bits=8, act_bits=8)).eval()
    assert len(list(tensor_quantizers(student))) >= 4
    assert not any(isinstance(m, nn.BatchNorm2d) for m in student.modules())
    batch = family.batch()
    save_quantized(student, tmp_path / "s", packed=packed, fp_dtype=torch.float32)
    again = load_quantized(tmp_path / "s").eval()
    assert len(list(tensor_quantizers(again))) == len(list(tensor_quantizers(student)))
    assert torch.equal(logits(again, batch), logits(student, batch))


def test_efficientnet_blocks_with_skip_are_rewritten(tmp_path, crops):
    """timm EfficientNet-Lite0: every InvertedResidual / DepthwiseSeparableConv with a skip gets the deploy quantizers
    (the rewritten forward keeps the folded teacher's function) and each of its adds becomes a QLinearAdd; the int8
    graph computes the student's function (its depthwise stack amplifies a one-code difference into several logits,
    so this needs the student's integer-engine arithmetic in evaluation: the float path differs by 3.5 of 38)."""
    teacher = teacher_of("efficientnet_lite0")
    student = quantize_model(copy.deepcopy(teacher), DEPLOY)
    skips = [m for m in teacher.modules() if getattr(m, "has_skip", False)]
    rewritten = {n.rpartition(".")[0] for n, _, _, _ in tensor_quantizers(student)}
    assert rewritten - {"global_pool.pool"} == {n for n, m in teacher.named_modules() if getattr(m, "has_skip", 0)}
    assert len(skips) == 9
    for _, q in named_quantizers(student):
        q.bypass = True
    with torch.no_grad():
        ref = teacher(crops[:2])
        assert torch.allclose(student(crops[:2]), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    for _, q in named_quantizers(student):
        q.bypass = False
    calibrate(student, [crops[:8]])
    ort = pytest.importorskip("onnxruntime")
    path = export_onnx(student.eval(), tmp_path / "e.onnx", crops[:1])
    ops = _ort_ops(path, tmp_path)
    assert ops.get("QLinearAdd") == 9 and ops.get("Add") == ops.get("MatMulIntegerToFloat") == 1, ops  # + fc bias
    # ReLU6 before a grid reaching past 6 is clamped on the integer codes: every conv runs as QLinearConv (the head's
    # output is quantized by its pool's input quantizer)
    convs = sum(isinstance(m, nn.Conv2d) for m in student.modules())
    assert ops.get("QLinearConv") == convs and not ops.get("FusedConv") and not ops.get("Conv"), ops
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": crops.numpy()})[0]
    with torch.no_grad():
        ref = student(crops).numpy()
    # the trunk is bit-exact; the global pool averages 2x2 codes in float (onnxruntime and torch sum in different
    # orders), so a mean exactly halfway between two classifier-input codes can round either way (measured 0.3%)
    assert np.abs(out - ref).max() <= 0.01 * np.abs(ref).max() and (out.argmax(1) == ref.argmax(1)).all()


def test_full_8bit_weight_codes_warn_on_a_cpu_without_vnni(tmp_path, crops, caplog):
    from sqakd_hf.export.onnx_integer import cpu_has_vnni

    if cpu_has_vnni():
        pytest.skip("this CPU has VNNI: 8-bit weight codes do not saturate in onnxruntime")
    pytest.importorskip("onnxruntime")
    student = _student("resnet10t", crops, QuantConfig(deploy="onnx-vnni", weight_bits=8, act_bits=8,
                                                       modules_to_not_convert=[]))
    assert {layer.weight_quantizer.bits for _, layer in quant_layers(student)} == {8}
    with caplog.at_level("WARNING", logger="sqakd_hf"):
        export_onnx(student, tmp_path / "m.onnx", crops[:1])
    assert "8-bit weight codes" in caplog.text and "deploy='onnx'" in caplog.text


def test_pickled_deploy_student_loads_in_a_fresh_process(tmp_path, crops):
    """The rewritten block classes resolve by name where no block was rewritten yet (torch.save / pickle)."""
    import subprocess
    import sys

    student = _student("resnet10t", crops)
    torch.save(student, tmp_path / "m.pt")
    torch.save(crops[:2], tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(student(crops[:2]), tmp_path / "ref.pt")
    code = ("import torch; m = torch.load('m.pt', weights_only=False).eval(); x = torch.load('x.pt')\n"
            "with torch.no_grad(): assert torch.equal(m(x), torch.load('ref.pt'))\n"
            "print(type(m.layer1[0]).__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "DeployBasicBlock", out.stderr[-2000:]


def test_tf_same_padding_convs_export_as_integer_convs(tmp_path, crops, monkeypatch):
    """timm's tf_* models pad dynamically (Conv2dSame): the export pads by the example size's constant amounts, folded
    into each conv's pads, so every conv (the head's output quantized before the global pool) is a QLinearConv,
    with no Pad, no float Conv and no shape arithmetic left. The function is unchanged, on an even size (asymmetric TF
    pads) and an odd one: the static forward gives the student's logits exactly, and the graph run unoptimized (Q/DQ in
    float) gives exactly the logits of the graph traced from the student's own dynamic padding; optimized (integer
    kernels), it gives the student's logits up to float rounding."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    import contextlib

    import sqakd_hf.export.onnx as onnx_export
    from sqakd_hf.export.same_padding import same_padding_convs, static_same_padding

    teacher = teacher_of("tf_efficientnet_lite0")
    student = quantize_model(copy.deepcopy(teacher), DEPLOY)
    assert len(same_padding_convs(student)) == 5  # the stem and four stride-2 depthwise convs
    calibrate(student, [crops[:8]])
    student.eval()
    convs = sum(isinstance(m, nn.Conv2d) for m in student.modules())
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL

    def unoptimized(path: Path, x: torch.Tensor) -> np.ndarray:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return session.run(None, {"input": x.numpy()})[0]

    for size in (64, 57):
        x = crops[:4] if size == 64 else torch.nn.functional.interpolate(crops[:4], size=size, mode="bilinear")
        with torch.no_grad(), onnx_export.qdq_mode(student):
            ref = student(x)
            with static_same_padding(student, lambda: student(x[:1])) as made_static:
                assert made_static == 5 and torch.equal(student(x), ref)
        path = export_onnx(student, tmp_path / f"tf{size}.onnx", x[:1])
        written = {n.op_type for n in onnx.load(str(path)).graph.node}
        assert not written & {"Pad", "Shape", "Ceil"}, written
        ops = _ort_ops(path, tmp_path)
        assert ops.get("QLinearConv") == convs and not ops.get("FusedConv") and not ops.get("Conv"), ops
        assert not ops.get("Pad") and ops.get("DequantizeLinear", 0) <= 2, ops
        with monkeypatch.context() as m:  # the graph as traced from the student's dynamic padding
            m.setattr(onnx_export, "static_same_padding", lambda model, run: contextlib.nullcontext(0))
            dynamic = export_onnx(student, tmp_path / f"dynamic{size}.onnx", x[:1])
        assert "Pad" in {n.op_type for n in onnx.load(str(dynamic)).graph.node}
        np.testing.assert_array_equal(unoptimized(path, x), unoptimized(dynamic, x))
        integer = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            logits = student(x).numpy()
        # bit-exact trunk; float 2x2 global pool: halfway means may round either way (see the test above)
        assert np.abs(integer - logits).max() <= 0.01 * np.abs(logits).max()


def test_real_efficientnet_lite0_runs_as_integer_convs_and_agrees(effnet_teacher, tmp_path):
    """The real tf_efficientnet_lite0 (ImageNet weights) as a deploy-mode W8A8 student: in onnxruntime every conv is a
    QLinearConv (the five TF 'same' padding convs and the head included), no conv bias saturates int32 (its dead
    channels, with near-zero folded weights, get a larger weight step), and the int8 graph computes the fake-quant
    student's function on held-out photo crops: the same top-1 on every crop and logits equal up to float rounding.
    Measured at 224 px on 384 crops: 100% top-1, relative logit error 0.05% (was 96% / 3.2% with the bias rounded only
    by onnxruntime and the overflowing codes, 98.7% / 2.6% with the bias on its grid but the student's float32
    fake-quant arithmetic, whose rare one-code flips the depthwise stack amplifies)."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from sqakd_hf.deploy_mode import BIAS_CODE_LIMIT

    student = quantize_model(copy.deepcopy(effnet_teacher), DEPLOY)
    calib, held = photo_crops(16, seed=0, size=160), photo_crops(32, seed=1, size=160)
    calibrate(student, [calib[:8], calib[8:]])
    student.eval()
    path = export_onnx(student, tmp_path / "lite0.onnx", calib[:1])
    ops = _ort_ops(path, tmp_path)
    convs = sum(isinstance(m, nn.Conv2d) for m in student.modules())
    assert ops.get("QLinearConv") == convs and not ops.get("FusedConv") and not ops.get("Conv"), ops
    graph = onnx.load(str(tmp_path / "optimized.onnx")).graph
    biases = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    codes = [biases[n.input[8]] for n in graph.node if n.op_type == "QLinearConv" and len(n.input) > 8]
    assert len(codes) == convs and max(int(np.abs(c.astype(np.int64)).max()) for c in codes) <= BIAS_CODE_LIMIT
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": held.numpy()})[0]
    with torch.no_grad():
        ref = student(held).numpy()
    assert (out.argmax(1) == ref.argmax(1)).all()
    assert np.linalg.norm(out - ref) <= 0.005 * np.linalg.norm(ref), np.linalg.norm(out - ref) / np.linalg.norm(ref)
