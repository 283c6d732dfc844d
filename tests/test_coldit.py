"""CoLDiT: BI-RADS conditions, label dropout and CFG, the autoencoder's loss, the shared loop's exact resume in both
stages, sampling into a manifest, and refusal of a model folder of the other backbone."""

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from busgen_lib.data.dataset import BUSDataset
from busgen_lib.data.manifest import read_manifest
from busgen_lib.data.schema import BIRADS_CLASSES, BIRADS_PATHOLOGY
from busgen_lib.diffusion import train as train_module
from busgen_lib.diffusion.checkpoint import backbone_of, latest_checkpoint, load_coldit, load_model, save_model
from busgen_lib.diffusion.coldit import CoLDiT, build_coldit, set_latent_scale, vae_loss
from busgen_lib.diffusion.model import build_model
from busgen_lib.diffusion.pipeline import sample_dataset
from busgen_lib.diffusion.plan import birads_plan, explicit_birads_plan
from busgen_lib.diffusion.sample import cfg_eps, sample
from busgen_lib.diffusion.train import pretrain, weights_digest
from busgen_lib.errors import DataError, UsageError

STEPS = dict(steps=6, batch_size=4, checkpoint_every=3, warmup_steps=1, log_every=1)


@pytest.fixture(scope="module")
def coldit_run(tiny_phantom, tmp_path_factory):
    """An uninterrupted smoke CoLDiT run of 6 + 6 steps: the reference for resumes and the model to sample."""
    return pretrain(tiny_phantom, "smoke", tmp_path_factory.mktemp("coldit") / "run", backbone="dit",
                    train_overrides=STEPS, progress=False)


def _model(**overrides) -> CoLDiT:
    torch.manual_seed(0)
    return build_coldit("smoke", **overrides).eval()


# --------------------------------------------------------------------------- conditions

def test_birads_rows_become_indices_1_to_5_and_others_are_refused_by_row(tiny_phantom):
    df = read_manifest(tiny_phantom)
    rows = df[df["birads"].astype(str).isin(BIRADS_CLASSES)].head(12)
    items = BUSDataset(rows, birads=True)
    assert [int(items[i]["birads"]) for i in range(len(rows))] == \
        [BIRADS_CLASSES.index(str(b)) + 1 for b in rows["birads"]]
    other = df[~df["birads"].astype(str).isin(BIRADS_CLASSES)].head(1)
    with pytest.raises(DataError, match=rf"row {other.index[0] + 1} .*birads"):
        BUSDataset(other, birads=True)
    assert "birads" not in BUSDataset(rows)[0]  # BUSGen's items are unchanged


def test_generated_birads_are_labelled_with_the_likelier_pathology():
    malignancy = {"3": (0, 2), "4a": (2, 10), "4b": (10, 50), "4c": (50, 95), "5": (95, 100)}  # ACR likelihood, %
    assert BIRADS_PATHOLOGY == {b: "malignant" if lo >= 50 else "benign" for b, (lo, hi) in malignancy.items()}


def test_dit_labels_map_birads_to_classes_with_one_null_class():
    model = _model()
    birads = torch.tensor([1, 2, 3, 4, 5, 0])
    assert model.labels(birads).tolist() == [0, 1, 2, 3, 4, 5]  # 0 (unknown) → the null class 5
    assert model.labels(birads, force_drop=torch.tensor([1, 0, 0, 0, 0, 0], dtype=torch.bool)).tolist()[0] == 5


def test_label_dropout_happens_once_per_sample_for_all_blocks():
    model = _model(p_uncond=0.5)
    x, t, birads = torch.randn(16, *model.latent_shape), torch.randint(0, 1000, (16,)), torch.randint(1, 6, (16,))
    torch.manual_seed(11)
    trained = model.train()(x, t, birads)
    torch.manual_seed(11)  # replay the one draw per sample
    drop = torch.rand(16) < 0.5
    assert 0 < drop.sum() < 16
    torch.testing.assert_close(trained, model.eval()(x, t, birads, force_drop=drop))


def test_cfg_is_eq2_for_the_latent_model():
    model, w = _model(), 1.7
    x, birads = torch.randn(3, *model.latent_shape), torch.tensor([1, 3, 5])
    t = torch.tensor(400)
    cond = model(x, t, birads)
    uncond = model(x, t, birads, force_drop=torch.ones(3, dtype=torch.bool))
    torch.testing.assert_close(cfg_eps(model, x, t, {"birads": birads}, w), (1 + w) * cond - w * uncond)
    assert not torch.allclose(cond, uncond)


# --------------------------------------------------------------------------- autoencoder

def test_vae_loss_is_reconstruction_plus_weighted_gaussian_kl():
    model, beta = _model(), 0.3
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    torch.manual_seed(5)
    loss = vae_loss(model, {"image": x}, beta)
    moments = model.vae.quant_conv(model.vae.encoder(x))
    mean, logvar = moments.chunk(2, dim=1)
    logvar = logvar.clamp(-30, 20)
    torch.manual_seed(5)  # replay z = μ + σ ε
    z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape)
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))
    expected = F.mse_loss(model.vae.decode(z).sample, x) + beta * kl.mean() / x[0].numel()
    torch.testing.assert_close(loss, expected)


def test_latent_scale_gives_unit_variance_latents():
    model = _model()
    images = torch.rand(8, 1, 32, 32) * 2 - 1
    scale = set_latent_scale(model, images)
    assert model.config.latent_scale == scale
    assert model.encode_latents(images).std().item() == pytest.approx(1.0, rel=1e-4)


# --------------------------------------------------------------------------- training: the shared loop

def test_both_stages_resume_after_a_kill_to_the_same_weights(tiny_phantom, coldit_run, tmp_path, monkeypatch):
    reference = weights_digest(load_coldit(coldit_run))
    for stage, name, folder in (("autoencoder", "vae_loss", tmp_path / "run" / "vae"),
                                ("DiT", "diffusion_loss", tmp_path / "run")):
        real, calls = getattr(train_module, name), {"n": 0}

        def dies_at_step_5(*args, real=real, calls=calls, **kwargs):
            calls["n"] += 1
            if calls["n"] == 5:  # after the step-3 checkpoint
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(train_module, name, dies_at_step_5)
        with pytest.raises(KeyboardInterrupt):
            pretrain(tiny_phantom, "smoke", tmp_path / "run", backbone="dit", train_overrides=STEPS, progress=False,
                     resume=stage == "DiT")
        assert latest_checkpoint(folder).name == "step-00000003", stage
        monkeypatch.setattr(train_module, name, real)
    resumed = pretrain(tiny_phantom, "smoke", tmp_path / "run", backbone="dit", resume=True, train_overrides=STEPS,
                       progress=False)
    assert weights_digest(load_coldit(resumed)) == reference


def test_training_changes_the_dit_and_keeps_the_stage_1_autoencoder(coldit_run):
    stage1, final = load_coldit(coldit_run.parent / "vae" / "model"), load_coldit(coldit_run)
    assert weights_digest(stage1.vae) == weights_digest(final.vae)
    assert weights_digest(stage1.dit) != weights_digest(final.dit)
    assert final.config.latent_scale != 1.0


def test_a_manifest_without_the_five_birads_categories_is_refused(tiny_phantom, tmp_path):
    df = pd.read_csv(tiny_phantom)
    df["birads"] = "2"
    df.to_csv(tmp_path / "no_birads.csv", index=False)
    for folder in ("images", "masks"):
        (tmp_path / folder).symlink_to(tiny_phantom.parent / folder)
    with pytest.raises(DataError, match="no train rows with birads 3, 4a, 4b, 4c, 5"):
        pretrain(tmp_path / "no_birads.csv", "smoke", tmp_path / "run", backbone="dit", train_overrides=STEPS)


def test_an_unknown_backbone_is_a_usage_error(tiny_phantom, tmp_path):
    with pytest.raises(UsageError, match="--backbone 'vit'"):
        pretrain(tiny_phantom, "smoke", tmp_path / "run", backbone="vit")


# --------------------------------------------------------------------------- backbones of model folders

def test_a_model_folder_of_the_other_backbone_is_refused(coldit_run, tmp_path):
    unet_dir = save_model(build_model("smoke", ("a",)), tmp_path / "unet")
    assert (backbone_of(coldit_run), backbone_of(unet_dir)) == ("dit", "unet")
    with pytest.raises(DataError, match="CoLDiT model \\(backbone dit\\).*needs a BUSGenUNet"):
        load_model(coldit_run)
    with pytest.raises(DataError, match="BUSGenUNet model \\(backbone unet\\).*needs a CoLDiT"):
        load_coldit(unet_dir)


# --------------------------------------------------------------------------- sampling

def test_latent_sampling_decodes_images_in_range():
    model = _model()
    images = sample(model, {"birads": torch.tensor([1, 5])}, steps=3, order=2, seeds=[0, 1], progress=False)
    assert images.shape == (2, 1, 32, 32) and images.abs().max() <= 1
    again = sample(model, {"birads": torch.tensor([1])}, steps=3, order=2, seeds=[0], progress=False)
    torch.testing.assert_close(again[0], images[0], atol=1e-5, rtol=0)  # the noise belongs to the sample


def test_sampling_writes_a_valid_manifest_labelled_with_birads(coldit_run, tmp_path):
    manifest = sample_dataset(coldit_run, 7, tmp_path / "gen", steps=2, batch_size=3)
    df = read_manifest(manifest)
    assert df["birads"].astype(str).tolist() == [BIRADS_CLASSES[i % 5] for i in range(7)]
    assert df["pathology"].tolist() == [BIRADS_PATHOLOGY[b] for b in df["birads"].astype(str)]
    again = sample_dataset(coldit_run, 7, tmp_path / "gen", steps=2, batch_size=3)  # finished: resumes to the same
    assert read_manifest(again)["image"].tolist() == df["image"].tolist()
    with pytest.raises(UsageError, match="CPSample"):
        sample_dataset(coldit_run, 2, tmp_path / "x", cond_fn=lambda x, t, e: 0 * e)


def test_birads_plans_cycle_categories_and_name_bad_rows(tmp_path):
    plan = birads_plan(7, ("4a", "5"), seed=3)
    assert [r.birads for r in plan] == ["4a", "5"] * 3 + ["4a"] and plan[3] == birads_plan(9, ("4a", "5"), 3)[3]
    (tmp_path / "plan.csv").write_text("birads,seed\n4c,\n5,12\n")
    rows = explicit_birads_plan(tmp_path / "plan.csv")
    assert [(r.birads, r.pathology) for r in rows] == [("4c", "malignant"), ("5", "malignant")] and rows[1].seed == 12
    (tmp_path / "bad.csv").write_text("birads\n4c\n2\n")
    with pytest.raises(DataError, match="row 2, birads: '2'"):
        explicit_birads_plan(tmp_path / "bad.csv")


# --------------------------------------------------------------------------- the study's measures (notebook 09)

def test_reconstruction_psnr_and_ssim_match_direct_formula_and_skimage(coldit_run, tiny_phantom):
    from skimage.metrics import structural_similarity

    from busgen_lib.data.dataset import load_images
    from busgen_lib.experiments.coldit import reconstruction

    table = reconstruction(coldit_run, tiny_phantom, split="train").set_index("metric")
    model, df = load_coldit(coldit_run).eval(), read_manifest(tiny_phantom)
    x = load_images(df[df["split"] == "train"], 32)
    with torch.no_grad():
        a, b = ((model.decode(model.encode_latents(x)) + 1) / 2).double().numpy(), ((x + 1) / 2).double().numpy()
    psnr = [10 * np.log10(1 / np.mean((p - q) ** 2)) for p, q in zip(a, b)]
    ssim = [structural_similarity(p[0], q[0], data_range=1.0, gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False) for p, q in zip(a, b)]
    assert table.loc["PSNR (dB)", "mean"] == pytest.approx(np.mean(psnr), abs=1e-3)
    assert table.loc["SSIM", "mean"] == pytest.approx(np.mean(ssim), abs=1e-6)
    assert table.loc["SSIM", "ci_lo"] <= table.loc["SSIM", "mean"] <= table.loc["SSIM", "ci_hi"]


def test_control_row_counts_the_judges_agreement_with_a_wilson_ci(tiny_phantom):
    from busgen_lib.evaluate.stats import proportion_ci
    from busgen_lib.experiments.coldit import control_row

    df = read_manifest(tiny_phantom)
    frame = df[df["birads"].astype(str).isin(BIRADS_CLASSES)]

    class Judge:  # says "4a" for every image
        classes = BIRADS_CLASSES

        def predict(self, images):
            return np.full(len(images), BIRADS_CLASSES.index("4a"))

    row = control_row("real", Judge(), frame, "birads", 32)
    hits = int((frame["birads"].astype(str) == "4a").sum())
    assert (row["n"], row["accuracy"], row["ci_lo"]) == (len(frame), hits / len(frame),
                                                         proportion_ci(hits, len(frame))[1])


def test_step_flops_of_a_linear_layer_are_its_closed_form():
    from busgen_lib.experiments.coldit import step_flops

    b, n_in, n_out = 8, 5, 3
    layer = torch.nn.Linear(n_in, n_out)
    batch = {"x": torch.randn(b, n_in), "y": torch.randn(b, n_out)}
    # forward x·Wᵀ and the weight gradient gᵀ·x, 2·b·n_in·n_out each (the input needs no gradient)
    assert step_flops(layer, lambda m, bt: F.mse_loss(m(bt["x"]), bt["y"]), batch) == 4 * b * n_in * n_out
    assert layer.weight.grad is None  # the count leaves no gradient behind


def test_the_unet_budget_spends_coldits_training_flops(tiny_phantom, tmp_path):
    from busgen_lib.experiments.coldit import birads_manifest, compute_budget
    from busgen_lib.profiles import get_coldit

    s = get_coldit("smoke")
    budget = compute_budget(birads_manifest(tiny_phantom, tmp_path), "smoke")
    table = budget.table.set_index("network")
    assert table["steps"].tolist() == [s.vae_train["steps"], s.dit_train["steps"], budget.unet_steps]
    assert table["batch"].tolist() == [s.vae_train["batch_size"], s.dit_train["batch_size"], 8]
    coldit_tflop = table["TFLOP"].iloc[:2].sum()
    # the smallest step count that reaches CoLDiT's FLOPs
    assert table.loc["BUSGen UNet", "TFLOP"] >= coldit_tflop
    assert table.loc["BUSGen UNet", "TFLOP"] - table.loc["BUSGen UNet", "GFLOP/step"] / 1e3 < coldit_tflop


def test_cli_refuses_the_other_backbones_options(coldit_run, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "busgen_lib", "sample", "--model", str(coldit_run), "--n", "2",
                             "--pathologies", "benign", "--out", str(tmp_path / "x")], capture_output=True, text=True,
                            env=env, timeout=600)  # a hang guard: a loaded 2-core machine took over 120 s
    assert result.returncode == 2 and "--backbone dit model: --pathologies do not apply" in result.stderr
