"""MixUp and CutMix (trainer/train/mixing.py): the permutation of the images is the targets', the
weights are lam and 1 - lam (CutMix's lam is the box's real area), alpha -> 0 leaves the batch as it
was, label smoothing and multi-label targets mix as timm's, only training batches are mixed, the
draws come from (seed, epoch, batch) and a crashed run with mixing and automatic augmentation
resumes bitwise."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.runs import Crash, CrashAt, assert_same_run, resumable_config
from trainer.config import ConfigError, load_config
from trainer.data.bundle import build_bundle
from trainer.data.loaders import ImageBatches
from trainer.inference.finished import load_run
from trainer.inference.predict import predict_probs
from trainer.inference.tta import tta_predict
from trainer.run import fit as spine
from trainer.train.loop import Learner
from trainer.train.lr_find import lr_find
from trainer.train.mixing import MixBatch, MixSpec, check_mixing, draw, mix, mix_generator
from trainer.train.tasks import make_task, soft_targets

N, SIZE = 16, 8


def indexed(n=N, size=SIZE):
    """Images whose every pixel is their own index, and labels equal to it (n classes)."""
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, size, size).contiguous()
    return x, torch.arange(n)


def mixed(spec, seed=0, batch=0, n=N, size=SIZE, kind="single_label"):
    x, y = indexed(n, size)
    d = draw(spec, n, size, size, mix_generator(seed, 0, batch))
    return (*mix(x, soft_targets(kind, y, n), d), d)


@pytest.mark.parametrize("spec", [MixSpec(mixup=1e-8), MixSpec(cutmix=1e-8), MixSpec(mixup=1e-8, cutmix=1e-8)])
def test_alpha_near_zero_leaves_the_batch_as_it_was(spec):
    x, y = indexed()
    for batch in range(20):
        xm, ym, _ = mixed(spec, batch=batch)
        assert torch.equal(xm, x)
        assert torch.equal(ym, F.one_hot(y, N).float())


@pytest.mark.parametrize("batch", range(8))
def test_mixup_targets_sum_to_one_and_follow_the_images_permutation(batch):
    xm, ym, d = mixed(MixSpec(mixup=1.0), batch=batch)
    assert d.perm is not None and 0.5 <= d.lam < 1
    assert torch.allclose(ym.sum(1), torch.ones(N))
    i = torch.arange(N, dtype=torch.float32)
    partner = ((xm[:, 0, 0, 0] - d.lam * i) / (1 - d.lam)).round().long()  # read from the pixels alone
    assert torch.allclose(xm, xm[:, :1, :1, :1].expand_as(xm))  # every pixel mixed alike
    want = d.lam * F.one_hot(torch.arange(N), N) + (1 - d.lam) * F.one_hot(partner, N)
    assert torch.allclose(ym, want.float(), atol=1e-6)
    assert sorted(partner.tolist()) == list(range(N))  # a permutation


@pytest.mark.parametrize("batch", range(30))
def test_cutmix_box_is_the_partners_and_lam_is_its_real_area(batch):
    size = 10
    xm, ym, d = mixed(MixSpec(cutmix=1.0), batch=batch, size=size)
    assert d.box is not None
    i = torch.arange(N).view(N, 1, 1)
    own = xm[:, 0] == i  # (n, h, w): pixels still the image's own
    kept = own.float().mean((1, 2))
    for k in range(N):
        partner = int(xm[k, 0][~own[k]][0]) if (~own[k]).any() else k
        if partner == k:
            continue  # paired with itself: nothing to see
        assert kept[k].item() == pytest.approx(d.lam)  # lam corrected to the box's area (clipped at the edges)
        want = d.lam * F.one_hot(torch.tensor(k), N) + (1 - d.lam) * F.one_hot(torch.tensor(partner), N)
        assert torch.allclose(ym[k], want.float(), atol=1e-6)
        assert torch.equal(xm[k, 0][~own[k]], torch.full_like(xm[k, 0][~own[k]], float(partner)))
        top, bottom, left, right = d.box  # one rectangle, the same for the whole batch
        assert (~own[k]).sum() == (bottom - top) * (right - left)
        assert (~own[k])[top:bottom, left:right].all()
    assert torch.allclose(ym.sum(1), torch.ones(N))


def test_cutmix_lam_is_corrected_when_the_box_is_clipped():
    clipped = 0
    for batch in range(200):
        d = draw(MixSpec(cutmix=1.0), N, SIZE, SIZE, mix_generator(0, 0, batch))
        top, bottom, left, right = d.box
        assert d.lam == pytest.approx(1 - (bottom - top) * (right - left) / SIZE**2)
        clipped += top == 0 or left == 0 or bottom == SIZE or right == SIZE
    assert clipped > 20  # the edges were reached, so the correction mattered


def test_mix_prob_and_switch_prob_choose_as_timm():
    def kinds(spec):
        ds = [draw(spec, N, SIZE, SIZE, mix_generator(1, 0, b)) for b in range(400)]
        return sum(d.perm is not None for d in ds) / 400, sum(d.box is not None for d in ds) / 400

    assert kinds(MixSpec(mixup=1.0, prob=0.0)) == (0.0, 0.0)
    assert kinds(MixSpec(mixup=1.0, cutmix=1.0, switch_prob=1.0)) == (1.0, 1.0)
    assert kinds(MixSpec(mixup=1.0, cutmix=1.0, switch_prob=0.0)) == (1.0, 0.0)
    share, cut = kinds(MixSpec(mixup=1.0, cutmix=1.0, prob=0.5, switch_prob=0.5))
    assert 0.4 < share < 0.6 and 0.15 < cut < 0.35


def test_multi_label_targets_are_mixed_multi_hot_rows():
    x, _ = indexed()
    y = (torch.arange(N).view(N, 1) >> torch.arange(4)) & 1  # row i: the bits of i (4 tags)
    d = draw(MixSpec(mixup=1.0), N, SIZE, SIZE, mix_generator(0, 0, 3))
    xm, ym = mix(x, soft_targets("multi_label", y.float(), 4), d)
    i = torch.arange(N, dtype=torch.float32)
    partner = ((xm[:, 0, 0, 0] - d.lam * i) / (1 - d.lam)).round().long()
    assert torch.allclose(ym, d.lam * y.float() + (1 - d.lam) * y[partner].float(), atol=1e-6)
    assert ((ym > 0) & (ym < 1)).any()  # soft where the partners' tags differ


def test_label_smoothing_applies_to_the_one_hot_before_mixing_as_timm():
    eps, n_cls = 0.1, 5
    task = make_task("single_label", label_smoothing=eps)
    torch.manual_seed(0)
    out, y = torch.randn(N, n_cls), torch.randint(0, n_cls, (N,))
    d = draw(MixSpec(mixup=1.0), N, SIZE, SIZE, mix_generator(0, 0, 0))
    _, ym = mix(torch.zeros(N, 1, SIZE, SIZE), soft_targets("single_label", y, n_cls), d)
    smooth = F.one_hot(y, n_cls).float() * (1 - eps) + eps / n_cls  # timm's mixup_target
    target = d.lam * smooth + (1 - d.lam) * smooth[d.perm]
    want = -(target * out.log_softmax(1)).sum(1).mean()
    assert task.loss_fn(out, ym).item() == pytest.approx(want.item(), rel=1e-6)
    assert task.loss_fn(out, ym).item() != pytest.approx(
        -(d.lam * F.one_hot(y, n_cls) + (1 - d.lam) * F.one_hot(y[d.perm], n_cls)).mul(out.log_softmax(1)).sum(1).mean()
    )  # the smoothing did happen


def test_draws_depend_on_seed_epoch_batch_only():
    spec = MixSpec(mixup=0.4, cutmix=1.0)
    a = draw(spec, N, SIZE, SIZE, mix_generator(3, 2, 5))
    draw(spec, N, SIZE, SIZE, mix_generator(3, 2, 6))  # another batch in between changes nothing
    b = draw(spec, N, SIZE, SIZE, mix_generator(3, 2, 5))
    assert (a.lam, a.box) == (b.lam, b.box) and torch.equal(a.perm, b.perm)
    others = [draw(spec, N, SIZE, SIZE, mix_generator(*k)) for k in [(3, 2, 6), (3, 3, 5), (4, 2, 5), (3, 2, 5, 1)]]
    assert not any(torch.equal(o.perm, a.perm) for o in others)


# ---- only training batches are mixed ------------------------------------------------------------


class Recording(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3 * SIZE * SIZE, N)
        self.seen = []

    def forward(self, x):
        self.seen.append((self.training, x.detach().clone()))
        return self.lin(x.flatten(1))


def loaders():
    x, y = indexed()
    common = dict(size=SIZE, mean=torch.zeros(3), std=torch.ones(3))
    u8 = x.to(torch.uint8)
    return ImageBatches(u8, y, 8, shuffle=True, **common), ImageBatches(u8, y, 8, **common)


class CountingMix(MixBatch):
    def __init__(self):
        super().__init__(MixSpec(mixup=1.0, cutmix=1.0), "single_label", N, seed=0)
        self.n = 0

    def before_batch(self, learn):
        self.n += 1
        super().before_batch(learn)


def learner(callbacks=()):
    torch.manual_seed(0)
    model = Recording()
    train, valid = loaders()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return Learner(model, opt, make_task("single_label"), train, valid, callbacks)


def test_validation_sees_plain_batches_and_training_mixed_ones():
    mixer = MixBatch(MixSpec(mixup=1.0, cutmix=1.0), "single_label", N, seed=0)
    learn = learner([mixer])
    learn.fit(1)
    train_seen = [x for training, x in learn.model.seen if training]
    valid_seen = [x for training, x in learn.model.seen if not training]
    plain_valid = [x for x, _ in learn.valid_dl]
    assert len(valid_seen) == len(plain_valid) and all(
        torch.equal(a, b) for a, b in zip(valid_seen, plain_valid, strict=True)
    )
    plain_train = [x for _, x, _ in learn.train_dl.iterate()]
    assert len(train_seen) == 2 and not any(torch.equal(a, b) for a, b in zip(train_seen, plain_train, strict=True))
    assert "accuracy" in learn.state.valid and learn.state.valid["valid_loss"] > 0  # reported on unmixed labels


def test_lr_find_runs_unmixed_so_its_curve_is_the_plain_one():
    plain = lr_find(learner(), num_it=6, seed=0)
    mixer = CountingMix()
    learn = learner([mixer])
    with_mixing = lr_find(learn, num_it=6, seed=0)
    assert mixer.n == 0 and with_mixing.losses == plain.losses and with_mixing.stopped == plain.stopped
    learn.fit(1)  # the same learner's training does mix
    assert mixer.n == 2


def test_predict_and_tta_see_plain_images(tmp_path, folder_data):
    cfg = tmp_path / "c.yaml"
    text = resumable_config(folder_data).replace("max_zoom: 1.1}", "max_zoom: 1.1, mixup: 1.0, cutmix: 1.0}")
    cfg.write_text(text.replace("epochs: 2", "epochs: 1"))
    spine.fit(load_config(cfg), tmp_path / "run")
    run = load_run(tmp_path / "run", "last")
    model, act = run.built.model.eval(), run.task().activation
    _, dl = build_bundle(run.cfg, 0, torch.device("cpu"), (run.size,)).loaders(8, run.size)
    with torch.no_grad():
        plain = torch.cat([act(model(x)) for x, _ in dl])
        flipped = torch.cat([act(model(x.flip(-1))) for x, _ in dl])  # side_on's one TTA view at 16 px
    assert torch.allclose(predict_probs(run, dl), plain, atol=1e-6)
    assert [v.name for v in run.tta_views()] == ["flip"]
    tta = tta_predict(model, dl, act, run.tta_views(), run.cfg.tta.beta)[0]
    assert torch.allclose(tta, 0.25 * plain + 0.75 * flipped, atol=1e-5)


# ---- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    ["mixup: -0.1", "cutmix: -1", "mix_prob: 1.5", "switch_prob: -0.1", "magnitude: 31", "ops: 0", "erasing: 1.1"],
)
def test_out_of_range_settings_are_config_errors(tmp_path, folder_data, bad):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(resumable_config(folder_data).replace("max_zoom: 1.1}", f"max_zoom: 1.1, {bad}}}"))
    with pytest.raises(ConfigError, match="transforms." + bad.split(":")[0]):
        load_config(cfg)


def test_mixing_a_language_model_is_refused(tmp_path, text_file):
    cfg = tmp_path / "lm.yaml"
    cfg.write_text(
        f"name: lm\nseed: 0\ndata: {{layout: text, path: '{text_file}', bptt: 8}}\n"
        "model: {arch: gru}\ntrain:\n  stages: [{epochs: 1, lr: 1.0e-3}]\ntransforms: {cutmix: 1.0}\n"
    )
    c = load_config(cfg)
    [(key, message)] = check_mixing(c)
    assert key == "transforms.cutmix" and "a language model (data.layout: text) has none" in message
    with pytest.raises(ValueError, match="transforms.cutmix: MixUp and CutMix mix images"):
        spine.fit(c, tmp_path / "run")
    assert check_mixing(c.model_copy(update={"transforms": c.transforms.model_copy(update={"cutmix": 0.0})})) == []


# ---- resume --------------------------------------------------------------------------------------


def test_a_run_with_mixing_and_auto_augmentation_resumes_bitwise(tmp_path, folder_data):
    """Killed mid-epoch (step 7 of 12: the second stage's first epoch) and resumed."""
    transforms = (
        "transforms: {preset: side_on, max_zoom: 1.1, auto: randaugment, erasing: 0.25, "
        "mixup: 0.4, cutmix: 1.0, mix_prob: 0.8}\n"
    )
    text = resumable_config(folder_data).replace("transforms: {preset: side_on, max_zoom: 1.1}\n", transforms)
    assert "auto: randaugment" in text
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    spine.fit(load_config(cfg), tmp_path / "reference")
    with pytest.raises(Crash):
        spine.fit(load_config(cfg), tmp_path / "run", callbacks=[CrashAt(7)])
    spine.fit(load_config(cfg), resume=tmp_path / "run")
    assert_same_run(tmp_path / "reference", tmp_path / "run")
