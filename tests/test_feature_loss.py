"""Feature losses ``fitnet`` and ``reviewkd`` against mdistiller's code on hand-made
tensors, and the ``intermediates`` of the timm: and kdplug: teachers.

The reference classes below are transcribed from github.com/megvii-research/mdistiller
(commit a08d46f): mdistiller/distillers/_common.py (ConvReg), FitNet.py
(FitNet.forward_train's feature term), ReviewKD.py (hcl_loss, ABF, ReviewKD.__init__ and
forward_train's feature term). Only the plumbing around them (the model calls, the config
object) is left out; ``raise NotImplemented(...)`` (a TypeError there) is NotImplementedError,
and ruff's rewrites (``super()``, an f-string) are the only others.
"""

import pytest
import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdplug import UsageError
from kdplug.components import LossStrategy, Teacher, missing
from kdplug.model_dir import save_student
from kdplug.plugins import create

ARCH = "test_resnet"


# -- mdistiller, transcribed ---------------------------------------------------------------
class ConvReg(nn.Module):
    """Convolutional regression"""

    def __init__(self, s_shape, t_shape, use_relu=True):
        super().__init__()
        self.use_relu = use_relu
        s_N, s_C, s_H, s_W = s_shape
        t_N, t_C, t_H, t_W = t_shape
        if s_H == 2 * t_H:
            self.conv = nn.Conv2d(s_C, t_C, kernel_size=3, stride=2, padding=1)
        elif s_H * 2 == t_H:
            self.conv = nn.ConvTranspose2d(s_C, t_C, kernel_size=4, stride=2, padding=1)
        elif s_H >= t_H:
            self.conv = nn.Conv2d(s_C, t_C, kernel_size=(1 + s_H - t_H, 1 + s_W - t_W))
        else:
            raise NotImplementedError(f"student size {s_H}, teacher size {t_H}")
        self.bn = nn.BatchNorm2d(t_C)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.conv(x)
        if self.use_relu:
            return self.relu(self.bn(x))
        else:
            return self.bn(x)


def fitnet_term(conv_reg, feat_loss_weight, feature_student, feature_teacher):
    """FitNet.forward_train's loss_feat (feats[hint_layer] given directly)."""
    f_s = conv_reg(feature_student)
    return feat_loss_weight * F.mse_loss(f_s, feature_teacher)


def hcl_loss(fstudent, fteacher):
    loss_all = 0.0
    for fs, ft in zip(fstudent, fteacher):
        n, c, h, w = fs.shape
        loss = F.mse_loss(fs, ft, reduction="mean")
        cnt = 1.0
        tot = 1.0
        for l in [4, 2, 1]:  # noqa: E741 (mdistiller's name)
            if l >= h:
                continue
            tmpfs = F.adaptive_avg_pool2d(fs, (l, l))
            tmpft = F.adaptive_avg_pool2d(ft, (l, l))
            cnt /= 2.0
            loss += F.mse_loss(tmpfs, tmpft, reduction="mean") * cnt
            tot += cnt
        loss = loss / tot
        loss_all = loss_all + loss
    return loss_all


class ABF(nn.Module):
    def __init__(self, in_channel, mid_channel, out_channel, fuse):
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channel, mid_channel, kernel_size=1, bias=False),
            nn.BatchNorm2d(mid_channel),
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channel, out_channel, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(out_channel),
        )
        if fuse:
            self.att_conv = nn.Sequential(
                nn.Conv2d(mid_channel * 2, 2, kernel_size=1),
                nn.Sigmoid(),
            )
        else:
            self.att_conv = None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x, y=None, shape=None, out_shape=None):
        n, _, h, w = x.shape
        x = self.conv1(x)
        if self.att_conv is not None:
            y = F.interpolate(y, (shape, shape), mode="nearest")
            z = torch.cat([x, y], dim=1)
            z = self.att_conv(z)
            x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
        if x.shape[-1] != out_shape:
            x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
        y = self.conv2(x)
        return y, x


class ReviewKDReference(nn.Module):
    """ReviewKD.__init__ (its cfg as arguments) and forward_train's loss_reviewkd, given the
    student's feats and pooled_feat and the teacher's preact_feats and pooled_feat."""

    def __init__(self, shapes, out_shapes, in_channels, out_channels, weight, warmup_epochs):
        super().__init__()
        self.shapes, self.out_shapes = shapes, out_shapes
        self.reviewkd_loss_weight, self.warmup_epochs = weight, warmup_epochs
        abfs = nn.ModuleList()
        mid_channel = min(512, in_channels[-1])
        for idx, in_channel in enumerate(in_channels):
            abfs.append(ABF(in_channel, mid_channel, out_channels[idx], idx < len(in_channels) - 1))
        self.abfs = abfs[::-1]

    def forward(self, features_student, features_teacher, **kwargs):
        x = features_student["feats"] + [
            features_student["pooled_feat"].unsqueeze(-1).unsqueeze(-1)
        ]
        x = x[::-1]
        results = []
        out_features, res_features = self.abfs[0](x[0], out_shape=self.out_shapes[0])
        results.append(out_features)
        for features, abf, shape, out_shape in zip(
            x[1:], self.abfs[1:], self.shapes[1:], self.out_shapes[1:]
        ):
            out_features, res_features = abf(features, res_features, shape, out_shape)
            results.insert(0, out_features)
        features_teacher = features_teacher["preact_feats"][1:] + [
            features_teacher["pooled_feat"].unsqueeze(-1).unsqueeze(-1)
        ]
        return (
            self.reviewkd_loss_weight
            * min(kwargs["epoch"] / self.warmup_epochs, 1.0)
            * hcl_loss(results, features_teacher)
        )


# -- helpers -------------------------------------------------------------------------------
def randn(*shape, seed, grad=False):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return x.requires_grad_(grad)


def assert_same_gradients(ours: nn.Module, reference: nn.Module) -> None:
    theirs = dict(reference.named_parameters())
    for name, parameter in ours.named_parameters():
        torch.testing.assert_close(parameter.grad, theirs[name].grad, rtol=1e-5, atol=1e-6)


# -- fitnet --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "student, teacher, conv",
    [
        ((3, 8, 8), (5, 4, 4), "Conv2d(3, 5, kernel_size=(3, 3), stride=(2, 2)"),  # s_H = 2 t_H
        ((3, 4, 4), (5, 8, 8), "ConvTranspose2d(3, 5, kernel_size=(4, 4), stride=(2, 2)"),
        ((3, 6, 5), (5, 4, 4), "Conv2d(3, 5, kernel_size=(3, 2), stride=(1, 1))"),  # s_H >= t_H
        ((3, 4, 4), (5, 4, 4), "Conv2d(3, 5, kernel_size=(1, 1), stride=(1, 1))"),
    ],
)
def test_fitnet_equals_mdistillers_loss_and_gradients(student, teacher, conv):
    loss = create("losses", "fitnet,weight=100")
    ours = loss.build_projector([student], [teacher])
    assert repr(ours.conv).startswith(conv)
    reference = ConvReg((2, *student), (2, *teacher))
    reference.load_state_dict(ours.state_dict())
    f_s, f_s_ref = randn(2, *student, seed=0, grad=True), randn(2, *student, seed=0, grad=True)
    f_t = randn(2, *teacher, seed=1)

    value = loss.feature_loss(ours, [f_s], [f_t])
    expected = fitnet_term(reference, 100.0, f_s_ref, f_t)
    torch.testing.assert_close(value, expected)
    value.backward()
    expected.backward()
    torch.testing.assert_close(f_s.grad, f_s_ref.grad)
    assert_same_gradients(ours, reference)


@pytest.mark.parametrize(
    "student, teacher",
    [((3, 3, 3), (5, 4, 4)), ((3, 8, 6), (5, 4, 4)), ((3, 6, 3), (5, 4, 4))],
)
def test_fitnet_refuses_shapes_convreg_cannot_map(student, teacher):
    loss = create("losses", "fitnet,stage=1")
    with pytest.raises(UsageError) as caught:
        loss.build_projector([student], [teacher])
    message = str(caught.value)
    assert message.startswith("fitnet: stage 1: the student's features")
    assert str(student) in message and str(teacher) in message and "\n" not in message


# -- reviewkd ------------------------------------------------------------------------------
# student stages (C, H, W) shallowest first, and the teacher's: other widths, and the
# teacher's middle stage twice the student's size (out_shape resizes there); the fused
# features are resized up from the deeper stage's output (2x2 to 4x4, 8x8 to 8x8)
STUDENT = [(3, 8, 8), (4, 4, 4), (6, 2, 2)]
TEACHER = [(5, 8, 8), (7, 8, 8), (9, 2, 2)]


def reviewkd_pair(spec: str, warmup: int, weight: float):
    """Our reviewkd and projector, and mdistiller's ReviewKD with the same weights."""
    loss = create("losses", spec)
    ours = loss.build_projector(STUDENT, TEACHER)
    reference = ReviewKDReference(
        shapes=[1] + [s[1] for s in STUDENT[::-1]],  # mdistiller lists sizes deepest first
        out_shapes=[1] + [t[1] for t in TEACHER[::-1]],
        in_channels=[s[0] for s in STUDENT] + [STUDENT[-1][0]],  # and channels shallowest first
        out_channels=[t[0] for t in TEACHER] + [TEACHER[-1][0]],
        weight=weight,
        warmup_epochs=warmup,
    )
    reference.load_state_dict(ours.state_dict())
    return loss, ours, reference


def student_features(seed: int) -> list[torch.Tensor]:
    return [randn(2, *shape, seed=seed + i, grad=True) for i, shape in enumerate(STUDENT)]


def test_reviewkd_equals_mdistillers_loss_and_gradients():
    loss, ours, reference = reviewkd_pair("reviewkd,weight=5,warmup=4", warmup=4, weight=5.0)
    assert loss.feature_stages == [-3, -2, -1]
    f_s, f_s_ref = student_features(0), student_features(0)
    f_t = [randn(2, *shape, seed=10 + i) for i, shape in enumerate(TEACHER)]
    stem = randn(2, 2, 8, 8, seed=20)  # mdistiller's teacher feats start with the stem's
    pooled_s = F.adaptive_avg_pool2d(f_s_ref[-1], 1).flatten(1)  # its avgpool + reshape
    pooled_t = F.adaptive_avg_pool2d(f_t[-1], 1).flatten(1)

    loss.set_epoch(1, 10)  # mdistiller's epoch 2 (its trainer counts from 1)
    value = loss.feature_loss(ours, f_s, f_t)
    expected = reference(
        {"feats": f_s_ref, "pooled_feat": pooled_s},
        {"preact_feats": [stem, *f_t], "pooled_feat": pooled_t},
        epoch=2,
    )
    assert loss.factor == 0.5
    torch.testing.assert_close(value, expected)
    value.backward()
    expected.backward()
    for ours_grad, expected_grad in zip(f_s, f_s_ref):
        torch.testing.assert_close(ours_grad.grad, expected_grad.grad)
    assert_same_gradients(ours, reference)


def test_reviewkd_warmup_factor_follows_mdistillers_epochs():
    loss = create("losses", "reviewkd,warmup=4")
    factors = []
    for epoch in range(6):
        loss.set_epoch(epoch, 6)
        factors.append(loss.factor)
    mdistiller = [min(epoch / 4, 1.0) for epoch in range(1, 7)]  # its epochs 1, 2, ...
    assert factors == mdistiller == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    no_warmup = create("losses", "reviewkd,warmup=0")
    no_warmup.set_epoch(0, 6)
    assert no_warmup.factor == 1.0


def test_reviewkd_projector_shapes_and_mid_channels():
    loss = create("losses", "reviewkd,max_mid_channel=4")
    projector = loss.build_projector(STUDENT, TEACHER)
    assert [abf.conv1[0].out_channels for abf in projector.abfs] == [4] * 4  # min(4, 6)
    assert [abf.att_conv is None for abf in projector.abfs] == [True, False, False, False]
    with torch.no_grad():
        results = projector([*student_features(0), torch.randn(2, 6, 1, 1)])
    assert [tuple(r.shape[1:]) for r in results] == [*TEACHER, (9, 1, 1)]
    wide = create("losses", "reviewkd").build_projector(STUDENT, TEACHER)
    assert wide.abfs[0].conv1[0].out_channels == 6  # min(512, the student's last width)


# -- the contract and the options ----------------------------------------------------------
def test_feature_losses_fulfil_the_contract_on_their_base():
    logits, labels = randn(3, 4, seed=0), torch.tensor([0, 2, -1])
    target = torch.softmax(randn(3, 4, seed=1) / 2, -1)
    for spec, stages in (("fitnet", [-2]), ("reviewkd,stages=2,teacher=big", [-2, -1])):
        loss = create("losses", spec)
        assert missing(loss, LossStrategy) == []
        assert loss.feature_stages == stages and loss.uses_teachers  # base ce: teachers still
        assert loss.kd_weight == 0.0 and loss(logits, target, labels).item() == 0.0
    assert create("losses", "reviewkd,teacher=big").feature_teacher == "big"
    on_kd = create("losses", "fitnet,base=kd,T=4,kd_weight=0.5")
    kd = create("losses", "kd,T=4,kd_weight=0.5")
    assert (on_kd.temperature, on_kd.kd_weight, on_kd.feature_teacher) == (4.0, 0.5, None)
    torch.testing.assert_close(on_kd(logits, target, labels), kd(logits, target, labels))


@pytest.mark.parametrize(
    "spec, message",
    [
        ("fitnet,weight=0", "fitnet: weight must be > 0, got 0.0"),
        ("fitnet,teacher=", "fitnet: teacher must name a teacher, got ''"),
        ("fitnet,base=fitnet", "fitnet: base must name another loss, got 'fitnet'"),
        ("reviewkd,stages=0", "reviewkd: stages must be an integer >= 1, got 0"),
        ("reviewkd,warmup=-1", "reviewkd: warmup must be an integer >= 0, got -1"),
        ("reviewkd,max_mid_channel=0", "reviewkd: max_mid_channel must be an integer >= 1, got 0"),
        ("reviewkd,weight=-2", "reviewkd: weight must be > 0, got -2.0"),
        ("reviewkd,stages=1.5", "reviewkd: option stages='1.5' must be int"),
        ("reviewkd,base=kd,tau=3", "kd: unknown option 'tau'"),
    ],
)
def test_feature_loss_options_are_checked(spec, message):
    with pytest.raises(UsageError) as caught:
        create("losses", spec)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


# -- intermediates of the timm: and kdplug: teachers ---------------------------------------
def scrambled_resnet(seed: int) -> nn.Module:
    """test_resnet on 1 channel, 4 classes, random BN statistics (eval-mode outputs that a
    skipped normalization or a lost buffer would change)."""
    torch.manual_seed(seed)
    model = create("students", f"timm:{ARCH}", 4, 1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def check_intermediates(teacher, model: nn.Module, x: torch.Tensor, model_x: torch.Tensor):
    """intermediates gives forward's logits and the model's stages on its own inputs."""
    assert missing(teacher, Teacher) == [] and callable(teacher.intermediates)
    stages = [-3, -2, -1]
    with torch.no_grad():
        logits, features = teacher.intermediates(x, stages)
        torch.testing.assert_close(logits, teacher(x))
        _, expected = model.forward_intermediates(model_x, indices=stages)
    assert [f.shape for f in features] == [e.shape for e in expected]
    for feature, wanted in zip(features, expected):
        torch.testing.assert_close(feature, wanted)


def test_timm_teacher_intermediates_are_forwards_logits_and_its_stages(tmp_path):
    model = scrambled_resnet(0)
    safetensors.torch.save_file(model.state_dict(), str(tmp_path / "m.safetensors"))
    spec = f"timm:{ARCH},checkpoint={tmp_path / 'm.safetensors'},mean=0.3,std=0.4,size=16"
    teacher = create("teachers", spec)
    x = torch.rand(2, 1, 12, 12)
    model_x = (F.interpolate(x, size=(16, 16), mode="bilinear", antialias=True) - 0.3) / 0.4
    check_intermediates(teacher, model, x, model_x)
    with pytest.raises(UsageError) as caught:  # test_resnet has stages 0 to 4
        teacher.intermediates(x, [-6, 2])
    assert str(caught.value).startswith(
        "the teacher's model test_resnet has no feature stages [-6, 2] (timm: feature index"
    )


def test_kdplug_teacher_intermediates_are_forwards_logits_and_its_stages(tmp_path):
    model = scrambled_resnet(1)
    save_student(
        tmp_path / "student",
        model,
        architecture=ARCH,
        classes=["a", "b", "c", "d"],
        input_size=[1, 12, 12],
        mean=[0.25],
        std=[0.5],
    )
    teacher = create("teachers", f"kdplug:{tmp_path / 'student'}")
    x = torch.rand(2, 1, 20, 20)
    model_x = (F.interpolate(x, size=(12, 12), mode="bilinear", antialias=True) - 0.25) / 0.5
    check_intermediates(teacher, model, x, model_x)
