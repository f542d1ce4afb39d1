"""MIM's Knowledge Guidance Scheme (fusionzoo.interpret.kgs): the dominance weights against the
authors' expression, the loss terms and their gradients against a hand-written version on a tiny
gated model, the no-gate and early-fusion paths, and the path from train.py (heads trained,
records in metrics.jsonl, refusal before the run folder exists)."""

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from gated_toy import GatedToy
from process_helpers import train_script

import fusionzoo as fz
from fusionzoo.engine.builders import build_callbacks
from fusionzoo.engine.config import ConfigError
from fusionzoo.engine.loop import CallbackList, EpochState, train_one_epoch
from fusionzoo.engine.optim import build_optimizer
from fusionzoo.interpret.kgs import KGSCallback, dominance_weights

TINY = ["--model", "esanet", "--model-kwargs", "{encoder: test_resnet}", "--image-size", "32,32",
        "--train-samples", "4", "--val-samples", "2", "--batch-size", "2", "--epochs", "2", "--threads", "1",
        "--no-progress", "--no-report", "--log-interval", "1"]


def _batch(n=2, k=3, size=(32, 32), seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.randint(0, k, (n, *size), generator=g)
    mask[0, :2] = 255  # some ignored pixels
    return {"rgb": torch.randn(n, 3, *size, generator=g), "depth": torch.randn(n, 1, *size, generator=g), "mask": mask}


def test_dominance_weights_match_the_authors_three_modality_adjuster():
    la, ll, lv = 0.7, 0.2, 0.4
    total = la + ll + lv
    lam_a, lam_l, lam_v = la / total, ll / total, lv / total
    den = (1 + lam_a) * (1 + lam_l) + (1 + lam_v) * (1 + lam_l) + (1 + lam_a) * (1 + lam_v)
    lam, alpha = dominance_weights({"a": la, "l": ll, "v": lv})
    assert lam == pytest.approx({"a": lam_a, "l": lam_l, "v": lam_v}, rel=1e-12)
    assert alpha == pytest.approx({"l": 3 * (1 + lam_a) * (1 + lam_v) / den, "a": 3 * (1 + lam_l) * (1 + lam_v) / den,
                                   "v": 3 * (1 + lam_l) * (1 + lam_a) / den}, rel=1e-12)
    assert max(alpha, key=alpha.get) == "l" and sum(alpha.values()) == pytest.approx(3)


def _hand_loss(model, heads, batch, w, temperature):
    """The KGS terms written out from the paper / the authors' train.py, on the stage-2 taps."""
    mask = batch["mask"]
    store = {}
    hooks = [model.taps.get(t).register_forward_hook(lambda mod, a, out, t=t: store.__setitem__(t, out))
             for t in ("rgb.stage2", "depth.stage2", "rgb.stage2.purified", "depth.stage2.purified")]
    out = model({m: batch[m] for m in ("rgb", "depth")})
    for h in hooks:
        h.remove()

    def logits(m, x):
        return F.interpolate(heads[m](x), size=mask.shape[-2:], mode="bilinear", align_corners=False)

    valid = mask != 255
    ce, loss, intra = {}, 0.0, 0.0
    for m in ("rgb", "depth"):
        zu, zp = logits(m, store[f"{m}.stage2"]), logits(m, store[f"{m}.stage2.purified"])
        lu, lp = F.cross_entropy(zu, mask, ignore_index=255), F.cross_entropy(zp, mask, ignore_index=255)
        ce[m] = (zp, lp)
        loss = loss + w["unimodal"] * (lu + lp)
        if lp < lu:   # purified is better: it teaches the unpurified
            intra = intra + ((zp.softmax(1).detach() - zu.softmax(1)) ** 2).sum(1)[valid].mean()
        else:
            intra = intra + ((zp.softmax(1) - zu.softmax(1).detach()) ** 2).sum(1)[valid].mean()
    loss = loss + w["intra"] * intra
    lam_r = float(ce["rgb"][1].detach()) / float(ce["rgb"][1].detach() + ce["depth"][1].detach())
    lam = {"rgb": lam_r, "depth": 1 - lam_r}
    alpha = {"rgb": 2 * (1 + lam["depth"]) / (2 + lam["rgb"] + lam["depth"]),
             "depth": 2 * (1 + lam["rgb"]) / (2 + lam["rgb"] + lam["depth"])}
    t = "rgb" if ce["rgb"][1] < ce["depth"][1] else "depth"
    s = "depth" if t == "rgb" else "rgb"
    temp = temperature * alpha[t]
    pt = F.softmax(ce[t][0].detach() / temp, 1)
    kl = (pt * (pt.log() - F.log_softmax(ce[s][0] / temp, 1))).sum(1)[valid].mean()
    return out, loss + w["inter"] * kl * temp ** 2, t


def test_loss_terms_and_gradients_equal_the_hand_written_scheme():
    torch.manual_seed(0)
    model = GatedToy(num_classes=3).train()
    cb = KGSCallback(unimodal=0.5, intra=2.0, inter=0.7, temperature=3.0, log_every=1)
    cb.check(model)
    assert cb.stage == "stage2" and cb.purified_taps == {"rgb": "rgb.stage2.purified", "depth": "depth.stage2.purified"}
    params = cb.parameters(model)
    assert params and all(p.device == next(model.parameters()).device for p in params)
    cb.on_train_start(model)
    batch = _batch()
    cb.on_batch_start(batch)
    out = model({m: batch[m] for m in ("rgb", "depth")})
    loss = cb.extra_loss(model, batch["mask"], ())
    loss.backward()
    got = {n: p.grad for n, p in [*model.named_parameters(), *cb.heads.named_parameters()]}
    model.zero_grad(set_to_none=True)
    cb.heads.zero_grad(set_to_none=True)
    cb.on_train_end(model)
    out2, ref, teacher = _hand_loss(model, cb.heads, batch, cb.w, 3.0)
    torch.testing.assert_close(out2, out)
    ref.backward()
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)
    for n, p in [*model.named_parameters(), *cb.heads.named_parameters()]:
        if n.startswith("head."):   # the fused head gets nothing from KGS
            assert got[n] is None and p.grad is None
            continue
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6 * float(p.grad.abs().max()) + 1e-12)
    cb.on_after_backward(model, step=0, epoch=0)
    rec = cb.records()[0]
    assert rec["kind"] == "kgs" and rec["scope"] == "step" and rec["step"] == 1 and rec["teacher"] == teacher
    assert set(rec["intra"]) == {"rgb", "depth"} and sum(rec["alpha"].values()) == pytest.approx(2)


def test_a_dropped_modality_is_left_out_and_state_restores_the_heads():
    torch.manual_seed(0)
    model = GatedToy(num_classes=3).train()
    cb = KGSCallback(log_every=1)
    cb.parameters(model)
    cb.on_train_start(model)
    batch = _batch()
    cb.on_batch_start(batch)
    model({m: batch[m] for m in ("rgb", "depth")}, missing=("depth",))
    cb.extra_loss(model, batch["mask"], ("depth",)).backward()
    cb.on_after_backward(model, 0, 0)
    rec = cb.records()[0]
    assert set(rec["ce_purified"]) == {"rgb"} and "teacher" not in rec   # no inter-modal term with one modality
    assert cb.heads["depth"].weight.grad is None
    state = json.loads(json.dumps(cb.state_dict()))
    fresh = KGSCallback()
    fresh.load_state_dict(state)
    fresh.parameters(model)
    for k, v in cb.heads.state_dict().items():
        assert torch.equal(fresh.heads.state_dict()[k], v)


def test_without_gates_only_inter_modal_guidance_applies_and_it_says_so():
    model = fz.create_model("esanet", encoder="test_resnet", num_classes=3).train()
    cb = KGSCallback(log_every=1)
    with pytest.warns(UserWarning, match="only inter-modal guidance applies"):
        cb.check(model)
    assert cb.purified_taps == {} and cb.stage == "stage4"
    cb.parameters(model)
    cb.on_train_start(model)
    batch = _batch(size=(32, 32))
    cb.on_batch_start(batch)
    model({m: batch[m] for m in ("rgb", "depth")})
    cb.extra_loss(model, batch["mask"], ()).backward()
    cb.on_after_backward(model, 0, 0)
    rec = cb.records()[0]
    assert rec["intra"] == {} and rec["ce_purified"] == {} and rec["inter"] > 0
    assert cb.heads["rgb"].weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("name", "kwargs", "why"), [
    ("early_concat", {"encoder": "test_resnet"}, "no per-modality stream tap"),
    ("fcos_early_resnet18", {}, "supports segmentation models only"),
])
def test_models_without_streams_are_refused_in_one_line(name, kwargs, why):
    model = fz.create_model(name, **kwargs)
    with pytest.raises(ConfigError, match=why) as err:
        build_callbacks(["kgs"], model=model)
    assert str(err.value).startswith("--callbacks kgs:") and "\n" not in str(err.value)


def test_the_loop_refuses_callback_parameters_the_optimizer_lacks():
    model = GatedToy(num_classes=3)
    cb = KGSCallback()
    cb.parameters(model)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.0)   # without extra=
    with pytest.raises(ValueError, match="optimizer does not hold"):
        train_one_epoch(model, [_batch()], opt, None, modalities=("rgb", "depth"), device=torch.device("cpu"),
                        state=EpochState(), num_batches=1, callbacks=CallbackList([cb]))


class _Snapshot(KGSCallback):
    def on_train_start(self, model):
        self.initial = {k: v.clone() for k, v in self.heads.state_dict().items()}
        super().on_train_start(model)


def test_train_py_trains_the_heads_and_logs_kgs_records(tmp_path):
    train = train_script()
    cb = _Snapshot(log_every=1)
    with pytest.warns(UserWarning, match="only inter-modal guidance"):
        train.main([*TINY, "--out-dir", str(tmp_path), "--run-name", "k", "--callbacks="], callbacks=[cb])
    moved = [k for k, v in cb.heads.state_dict().items() if not torch.equal(v, cb.initial[k])]
    assert sorted(moved) == sorted(cb.initial)
    recs = [json.loads(line) for line in (tmp_path / "k" / "metrics.jsonl").read_text().splitlines()]
    kgs = [r for r in recs if r.get("kind") == "kgs"]
    assert [r["step"] for r in kgs if r["scope"] == "step"] == [1, 2, 3, 4]
    assert [r["epoch"] for r in kgs if r["scope"] == "epoch"] == [0, 1]
    assert all(math.isfinite(r["loss"]) for r in kgs)
    saved = json.loads((tmp_path / "k" / "callbacks.json").read_text())
    assert any(v.get("state_key") == "kgs" and v["heads"] for v in saved.values())


def test_train_py_refuses_early_fusion_before_the_run_folder_exists(tmp_path):
    train = train_script()
    argv = [*TINY, "--model", "early_concat", "--out-dir", str(tmp_path), "--run-name", "e", "--callbacks", "kgs"]
    with pytest.raises(ConfigError, match="early_concat.*early fusion") as err:
        train.main(argv)
    assert str(err.value).startswith("--callbacks kgs:") and not (tmp_path / "e").exists()


def test_on_a_mim_model_kgs_reads_the_purified_features_and_trains_the_gates():
    torch.manual_seed(0)
    model = fz.create_model("mim_add", encoder="test_resnet", num_classes=3).train()
    cb = KGSCallback(unimodal=1.0, intra=1.0, inter=0.0, log_every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no warning: the model has gates, its streams are unimodal
        cb.check(model)
    assert cb.purified_taps == {"rgb": "rgb.stage4.purified", "depth": "depth.stage4.purified"}
    cb.parameters(model)
    cb.on_train_start(model)
    batch = _batch()
    cb.on_batch_start(batch)
    model({m: batch[m] for m in ("rgb", "depth")})
    cb.extra_loss(model, batch["mask"], ()).backward()
    gates = list(model.gate_parameters())
    assert gates and any(p.grad is not None and p.grad.abs().sum() > 0 for p in gates)
    cb.on_after_backward(model, 0, 0)
    rec = cb.records()[0]
    assert set(rec["ce_purified"]) == {"rgb", "depth"} and set(rec["intra"]) == {"rgb", "depth"}
