"""Tests of the LeJEPA model (lejepa_kernels.lejepa): a tiny ViT at 32/16 px, CPU, a few seconds."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lejepa_kernels.lejepa import MLP, LeJEPA, LeJEPAOutput
from lejepa_kernels.reference import SlicedEppsPulley

ENCODER = "vit_tiny_patch16_224"  # embed_dim 192; dynamic_img_size lets it take 32 and 16 px
EMBED_DIM = 192
B, N_GLOBAL, N_LOCAL, N_SLICES, LAMB = 3, 2, 2, 64, 0.02


def make_model(sigreg: str) -> LeJEPA:
    torch.manual_seed(0)
    return LeJEPA(ENCODER, n_slices=N_SLICES, lamb=LAMB, drop_path_rate=0.0, sigreg=sigreg).train()


def make_views(seed: int = 1, b: int = B):
    g = torch.Generator().manual_seed(seed)
    global_views = [torch.randn(b, 3, 32, 32, generator=g) for _ in range(N_GLOBAL)]
    local_views = [torch.randn(b, 3, 16, 16, generator=g) for _ in range(N_LOCAL)]
    return global_views, local_views


@pytest.fixture(scope="module")
def ref_model() -> LeJEPA:
    return make_model("reference")


@pytest.fixture(scope="module")
def fused_model() -> LeJEPA:
    return make_model("fused")


def test_mlp_layout():
    mlp = MLP(8, [16, 16, 4], dropout=0.25)
    kinds = [type(m) for m in mlp]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout] * 2 + [nn.Linear, nn.Dropout]
    assert [mlp[i].out_features for i in (0, 4, 8)] == [16, 16, 4]
    assert mlp[2].inplace and mlp[3].p == 0.25 and mlp[9].p == 0.25
    assert mlp(torch.randn(5, 8)).shape == (5, 4)


def test_train_forward_shapes_loss_and_grads(ref_model):
    model = ref_model.train()
    model.zero_grad(set_to_none=True)
    step = int(model.sigreg.global_step)
    out = model(*make_views())

    assert isinstance(out, LeJEPAOutput)
    assert out.embedding.shape == (N_GLOBAL * B, EMBED_DIM)
    assert not out.embedding.requires_grad
    for t in (out.loss, out.inv_loss, out.sigreg_loss):
        assert t.shape == () and torch.isfinite(t)
    assert out.inv_loss > 0 and out.sigreg_loss > 0
    torch.testing.assert_close(out.loss, out.inv_loss + LAMB * out.sigreg_loss)
    assert int(model.sigreg.global_step) == step + 1

    out.loss.backward()
    for name in ("backbone.patch_embed.proj.weight", "backbone.blocks.0.attn.qkv.weight",
                 "projector.0.weight", "projector.1.0.weight", "projector.1.8.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None, name
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    model.zero_grad(set_to_none=True)


def _project_by_hand(model: LeJEPA, feats: torch.Tensor) -> torch.Tensor:
    """The default projector written out with functional ops (BatchNorm in training mode)."""
    lin0, mlp = model.projector[0], model.projector[1]
    h = F.linear(feats, lin0.weight, lin0.bias)
    for i in (0, 4):
        lin, bn = mlp[i], mlp[i + 1]
        h = F.linear(h, lin.weight, lin.bias)
        h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + bn.eps) * bn.weight + bn.bias
        h = h.relu()
    return F.linear(h, mlp[8].weight, mlp[8].bias)


def test_loss_terms_match_independent_recomputation(ref_model):
    model = ref_model.train()
    gv, lv = make_views(seed=2)
    step = model.sigreg.global_step.clone()
    out = model(gv, lv)

    with torch.no_grad():
        g_feats = model.backbone(torch.cat(gv))
        l_feats = model.backbone(torch.cat(lv))
        z = _project_by_hand(model, torch.cat([g_feats, l_feats]))  # [V*B, K]
        views = z.split(B)  # V tensors [B, K]
        center = sum(views[:N_GLOBAL]) / N_GLOBAL
        inv = sum(((center - v) ** 2).mean() for v in views) / len(views)
        sig_mod = SlicedEppsPulley(num_slices=N_SLICES)
        sig_mod.global_step.fill_(int(step))
        sig = sig_mod(z)

    torch.testing.assert_close(out.embedding, g_feats)
    torch.testing.assert_close(out.inv_loss.detach(), inv, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.sigreg_loss.detach(), sig, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.loss.detach(), inv + LAMB * sig, rtol=1e-4, atol=1e-6)


def test_compute_loss_helper():
    torch.manual_seed(3)
    proj = torch.randn(4, 5, 6)  # V=4, B=5, K=6, 2 global views
    seen = []

    def fake_sigreg(x):
        seen.append(x)
        return x.sum()

    loss, inv, sig = LeJEPA._compute_loss(proj, 2, fake_sigreg, 0.5)
    center = (proj[0] + proj[1]) / 2
    torch.testing.assert_close(inv, torch.stack([((center - proj[v]) ** 2).mean() for v in range(4)]).mean())
    assert seen[0].shape == (20, 6)
    torch.testing.assert_close(sig, proj.sum())
    torch.testing.assert_close(loss, inv + 0.5 * sig)


def test_fused_matches_reference(ref_model, fused_model):
    fused_model.load_state_dict(ref_model.state_dict(), strict=True)
    gv, lv = make_views(seed=4)
    outs, grads = [], []
    for model in (ref_model.train(), fused_model.train()):
        model.zero_grad(set_to_none=True)
        out = model(gv, lv)
        out.loss.backward()
        outs.append(out)
        grads.append(model.projector[0].weight.grad.clone())
        model.zero_grad(set_to_none=True)
    ref, fused = outs
    assert int(ref_model.sigreg.global_step) == int(fused_model.sigreg.global_step)
    for name in ("loss", "inv_loss", "sigreg_loss"):
        torch.testing.assert_close(fused[name].detach(), ref[name].detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fused.embedding, ref.embedding)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-6)


def test_state_dict_keys_and_round_trip(ref_model, fused_model):
    sd = ref_model.state_dict()
    for key in ("projector.0.weight", "projector.0.bias", "projector.1.0.weight", "projector.1.1.running_mean",
                "projector.1.1.weight", "projector.1.4.weight", "projector.1.5.weight", "projector.1.5.running_var",
                "projector.1.8.weight", "projector.1.8.bias", "sigreg.global_step", "sigreg.ep.t",
                "sigreg.ep.phi", "sigreg.ep.weights", "backbone.cls_token"):
        assert key in sd, key
    assert sd["projector.1.0.weight"].shape == (2048, 512)
    assert sd["projector.1.8.weight"].shape == (512, 2048)
    assert set(fused_model.state_dict()) == set(sd)

    ref_model.sigreg.global_step.fill_(7)  # a non-default value must survive the trip
    fused_model.load_state_dict(ref_model.state_dict(), strict=True)
    back = make_model("reference")
    back.load_state_dict(fused_model.state_dict(), strict=True)
    for key, value in back.state_dict().items():
        torch.testing.assert_close(value, sd[key] if key != "sigreg.global_step" else torch.tensor(7), msg=key)


def test_eval_mode(ref_model):
    model = ref_model.eval()
    try:
        step = int(model.sigreg.global_step)
        images = torch.randn(B, 3, 32, 32)
        with torch.no_grad():
            out = model(images=images)
            expected = model.backbone(images)
        assert out.embedding.shape == (B, EMBED_DIM)
        torch.testing.assert_close(out.embedding, expected)
        for t in (out.loss, out.inv_loss, out.sigreg_loss):
            assert t.shape == () and t.item() == 0.0 and t.device == images.device
        assert int(model.sigreg.global_step) == step
    finally:
        model.train()


def test_output_access():
    loss, emb, inv, sig = torch.tensor(1.0), torch.ones(2, 3), torch.tensor(2.0), torch.tensor(3.0)
    out = LeJEPAOutput(loss=loss, embedding=emb, inv_loss=inv, sigreg_loss=sig)
    assert out.loss is loss and out["embedding"] is emb and out[2] is inv and out[-1] is sig
    assert out.to_tuple() == (loss, emb, inv, sig)
    assert list(out.keys()) == ["loss", "embedding", "inv_loss", "sigreg_loss"]
    a, b, c, d = out
    assert (a, b, c, d) == (loss, emb, inv, sig)

    partial = LeJEPAOutput(embedding=emb)
    assert partial.loss is None and partial.to_tuple() == (emb,) and partial[0] is emb
    assert list(partial.keys()) == ["embedding"]
    with pytest.raises(KeyError):
        partial["loss"]


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="not_a_timm_model"):
        LeJEPA("not_a_timm_model", n_slices=N_SLICES)
    with pytest.raises(ValueError, match="sigreg"):
        LeJEPA(ENCODER, n_slices=N_SLICES, sigreg="triton-please")
    for lamb in (-1.0, float("nan"), float("inf"), "0.1", None):
        with pytest.raises((ValueError, TypeError), match="lamb"):
            LeJEPA(ENCODER, n_slices=N_SLICES, lamb=lamb)


def test_model_pickles_and_deep_copies(fused_model, tmp_path):
    gv, lv = make_views()
    path = tmp_path / "model.pt"
    torch.save(fused_model, path)
    for other in (torch.load(path, weights_only=False), copy.deepcopy(fused_model)):
        step = int(fused_model.sigreg.global_step)
        assert int(other.sigreg.global_step) == step
        torch.testing.assert_close(other(gv, lv).loss, fused_model(gv, lv).loss, rtol=0, atol=0)
        fused_model.sigreg.global_step.fill_(step)
        fused_model.sigreg.resync_step()


def test_bad_forward_inputs(ref_model):
    model = ref_model.train()
    gv, lv = make_views()
    step = int(model.sigreg.global_step)
    with pytest.raises(ValueError, match="global_views"):
        model(local_views=lv)
    with pytest.raises(ValueError, match="local_views"):
        model(gv, None)
    with pytest.raises(ValueError, match="local_views"):
        model(gv, [])
    with pytest.raises(ValueError, match="training mode"):
        model(images=gv[0])
    with pytest.raises(ValueError, match="batch size"):
        model(gv, make_views(b=B + 1)[1])
    with pytest.raises(ValueError, match="same shape"):
        model([gv[0], gv[1][:2]], lv)
    with pytest.raises(ValueError, match="4-D"):
        model([gv[0][0]], lv)
    assert int(model.sigreg.global_step) == step  # nothing ran

    model.eval()
    try:
        with pytest.raises(ValueError, match="images"):
            model(gv, lv)
        with pytest.raises(ValueError, match="4-D"):
            model(images=gv[0][0])
    finally:
        model.train()


def test_per_view_sigreg_and_paper_weighting():
    """per_view: the mean of each view's statistic on the same directions (fp64 oracle);
    paper: (1 - lamb) * inv + lamb * sigreg; the defaults are the seed's concat and inv + lamb * sigreg."""
    from conftest import grouped_oracle

    from lejepa_kernels import FusedSlicedEppsPulley
    from lejepa_kernels.reference import random_directions

    views = torch.randn(5, 9, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lamb, A = 0.3, random_directions(6, 16, 0)
    inv = (views[:2].mean(0) - views).square().mean()
    per_view = grouped_oracle(views, A, 3.0, 17).mean()
    concat = grouped_oracle(views.reshape(-1, 6), A, 3.0, 17).mean()
    for sigreg_views, weighting, want_sigreg, want_loss in [
        ("per_view", "paper", per_view, (1 - lamb) * inv + lamb * per_view),
        ("concat", "seed", concat, inv + lamb * concat),
    ]:
        loss, inv_loss, sigreg_loss = LeJEPA._compute_loss(
            views, 2, FusedSlicedEppsPulley(16), lamb, sigreg_views, weighting
        )
        torch.testing.assert_close(inv_loss, inv, rtol=1e-12, atol=0)
        torch.testing.assert_close(sigreg_loss, want_sigreg, rtol=1e-10, atol=0)
        torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sigreg_views="views"), "sigreg_views must be one of"),
        (dict(loss_weighting="lecun"), "loss_weighting must be one of"),
        (dict(loss_weighting="paper", lamb=1.5), "lamb must be <= 1"),
    ],
)
def test_bad_loss_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LeJEPA("test_vit", **kwargs)


def test_unbiased_and_orthogonal_reach_the_sigreg():
    """LeJEPA(unbiased=True, orthogonal=True)'s SIGReg term is the unbiased statistic on the
    orthonormalised directions, against the fp64 oracle; the seed's module refuses both."""
    from conftest import grouped_oracle

    from lejepa_kernels.blockwise import orthonormal_groups
    from lejepa_kernels.reference import random_directions

    model = LeJEPA("test_vit", n_slices=16, unbiased=True, orthogonal=True)
    views = torch.randn(4, 9, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _, _, sigreg_loss = LeJEPA._compute_loss(views, 2, model.sigreg.double(), 0.1)
    A = orthonormal_groups(random_directions(6, 16, 0))
    want = grouped_oracle(views.reshape(-1, 6), A, 3.0, 17, unbiased=True).mean()
    torch.testing.assert_close(sigreg_loss, want, rtol=1e-10, atol=0)
    for kwargs in (dict(unbiased=True), dict(orthogonal=True)):
        with pytest.raises(ValueError, match="need sigreg='fused'"):
            LeJEPA("test_vit", sigreg="reference", **kwargs)
