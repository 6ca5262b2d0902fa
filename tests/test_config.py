"""Every config composes and validates; typos and bad values fail with messages naming the key."""

import itertools
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException

import fastreg.configs
from fastreg.config import to_config
from fastreg.teachers import TEACHERS

CONFIGS = Path(fastreg.configs.__file__).parent
BASE = ["teacher.checkpoint=random", "data.root=/data/train", "trainer.out_dir=/tmp/x"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def load(overrides: list[str]):
    with initialize_config_module("fastreg.configs", version_base="1.3"):
        return to_config(compose("config", overrides=overrides))


@pytest.mark.parametrize("group", ["teacher", "student", "head", "loss", "data", "optim"])
def test_every_group_option_composes(group):
    for option in options(group):
        cfg = load(BASE + ["experiment=none", f"{group}={option}"])
        assert cfg.teachers and cfg.student.arch


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes(experiment):
    overrides = ["trainer.out_dir=/tmp/x", "data.root=/data/train", f"experiment={experiment}"]
    if experiment == "simreg_multi":
        overrides += ["teachers.0.checkpoint=random", "teachers.1.checkpoint=random"]
    elif experiment.endswith("_cached"):
        overrides += ["teacher.cache=/c"]
    elif experiment != "demo":
        overrides += ["teacher.checkpoint=random"]
    cfg = load(overrides)
    assert cfg.name == ("data" if experiment == "none" else experiment)  # none: /data/train is dataset "data"
    assert all(t.head is not None and t.name for t in cfg.teachers)


@pytest.mark.parametrize(
    "overrides, name",
    [
        (["data.root=/data/flowers/train"], "flowers"),  # a train/ split: its dataset's name
        (["data.root=/data/flowers/"], "flowers"),
        (["data.root=/data/my_photos"], "my_photos"),
        (["data.root=/data/flowers/train", "name=flowers_r18"], "flowers_r18"),
        (["data=synthetic"], "custom"),  # no folder
    ],
)
def test_experiment_none_runs_are_named_after_the_data_folder_unless_name_is_given(overrides, name):
    with initialize_config_module("fastreg.configs", version_base="1.3"):
        cfg = compose(
            "config", overrides=["experiment=none", "teacher.checkpoint=random", *overrides], return_hydra_config=True
        )
    assert cfg.name == name and cfg.hydra.run.dir == f"runs/{name}"  # the run folder


def test_paper_recipes():
    cfg = load(BASE + ["experiment=simreg_r50_r18"])
    assert (cfg.optim.base_lr, cfg.trainer.epochs, cfg.head.kind, cfg.loss.name) == (0.05, 130, "simreg4", "simreg")
    assert cfg.teachers[0].format == "moco" and not cfg.loss.center_teacher
    cfg = load(BASE + ["experiment=seed_r50_effb0"])
    assert (cfg.optim.base_lr, cfg.optim.warmup_epochs, cfg.trainer.epochs) == (0.03, 5, 200)
    assert (cfg.loss.queue_size, cfg.loss.tau_s, cfg.loss.tau_t) == (65536, 0.2, 1e-4)
    assert cfg.teachers[0].projection and cfg.head.kind == "seed"
    for student in ("effb0", "mbv3"):  # SEED's "*" rows: main_small-patch.py, swav_small_aug, 800 epochs
        cfg = load(BASE + [f"experiment=seed_swav_r50w2_{student}_sp"])
        d = cfg.data
        assert (d.small_patches, d.small_patch_size, d.small_patch_scale, cfg.trainer.epochs) == (
            6,
            96,
            [0.05, 0.14],
            800,
        )
        assert cfg.teachers[0].arch == "resnet50x2" and cfg.teachers[0].projection
    for teacher, fmt in (("byol", "byol"), ("swav", "swav")):  # the README's "(cached)" rows
        cfg = load(BASE + [f"experiment=simreg_{teacher}_r50_r18_cached", "teacher.cache=/c"])
        assert cfg.teachers[0].format == fmt and cfg.teachers[0].cache == "/c" and cfg.head.kind == "simreg4"
        with pytest.raises(ValueError, match="teacher.cache must be set: this recipe trains against cached"):
            load(BASE + [f"experiment=simreg_{teacher}_r50_r18_cached"])  # never an online teacher by mistake


# Issue 25's recipes: (recipe, teacher arch, its format, its feature's dim, student, cached). The arch names are
# timm's, registered in fastreg.teachers.TEACHERS.
DINO_RECIPES = [
    ("dinov3_vitl16_r50", "vit_large_patch16_dinov3", "dinov3", 1024, "resnet50", False),
    ("dinov3_vitl16_mbv3", "vit_large_patch16_dinov3", "dinov3", 1024, "mobilenet_v3_large", False),
    ("dinov2_vitg14_r18_cached", "vit_giant_patch14_dinov2", "dinov2", 1536, "resnet18", True),
]


@pytest.mark.parametrize("recipe, arch, fmt, dim, student, cached", DINO_RECIPES)
def test_dino_recipes_compose_with_their_teacher_student_and_simreg(recipe, arch, fmt, dim, student, cached):
    assert (CONFIGS / "experiment" / f"{recipe}.yaml").exists()  # the glob-parametrized tests skip a missing one
    extra = ["teacher.cache=/c"] if cached else ["teacher.checkpoint=random"]
    cfg = load(["trainer.out_dir=/tmp/x", "data.root=/d", f"experiment={recipe}", *extra])
    (t,) = cfg.teachers
    assert (cfg.name, t.arch, t.format, cfg.student.arch) == (recipe, arch, fmt, student)
    assert (t.feature, t.input_size, t.dtype, t.cache) == ("cls", 224, "auto", "/c" if cached else None)
    # SimReg's recipe otherwise: its loss, 4-layer head, SGD at 0.05 for 130 epochs (simreg_r50_r18)
    assert (cfg.loss.name, cfg.head.kind, cfg.optim.base_lr, cfg.trainer.epochs) == ("simreg", "simreg4", 0.05, 130)
    assert TEACHERS[arch].dim == dim  # the head regresses this many numbers
    if cached:
        with pytest.raises(ValueError, match="teacher.cache must be set"):
            load(["trainer.out_dir=/tmp/x", "data.root=/d", f"experiment={recipe}"])  # never the 1B teacher online


@pytest.mark.parametrize("option", [o for o in options("teacher") if o.endswith(("_dinov2", "_dinov3"))])
def test_dinov2_and_dinov3_teachers_run_at_224(option):
    """The resolution follows the patch size: 224 for /14 and /16, whatever the student's crop."""
    cfg = load(BASE + ["experiment=none", f"teacher={option}", "data.crop_size=160"])
    assert cfg.teachers[0].arch == option and cfg.teachers[0].input_size == 224


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.small_patches=6"], "feeds SEED's second queue, and loss=simreg"),
        (["data.teacher_view=weak"], "data.augment's, which is weak too"),
        (["data.teacher_view=wek"], "data.teacher_view='wek' is not one of same, weak"),
        (["data.teacher_crop=own"], "data.teacher_crop='own' is not one of shared, independent"),
        (["data.teacher_crop=independent"], "teachers' own crop, and data.teacher_view=same shows them the student's"),
        (["data.loader=torchvision", "loss=seed", "data.small_patches=2"], "built with DALI ops"),
        (["data.small_patch_scale=[0.2,0.1]"], "data.small_patch_scale must be"),
        (["teacher.cache=/c", "data.augment=strong", "data.teacher_view=weak"], "teacher.cache holds one feature"),
        (["teacher.cache=/c", "data.loader=synthetic"], "data.loader=synthetic has none"),
    ],
)
def test_views_that_cannot_work_together_are_refused_by_name(overrides, message):
    with pytest.raises(ValueError, match=message):
        load(BASE + ["experiment=none", *overrides])


def test_two_weak_views_need_independent_crops():
    """SimReg Table 7's "different crops, weak/weak" (--weak_weak without --single_aug): two weak views are two
    views only when their crops are drawn apart; with a shared box the teachers' view is the student's."""
    cfg = load(BASE + ["experiment=none", "data.teacher_view=weak", "data.teacher_crop=independent"])
    assert (cfg.data.augment, cfg.data.teacher_view, cfg.data.teacher_crop) == ("weak", "weak", "independent")
    with pytest.raises(ValueError, match="set data.augment=strong .*, data.teacher_crop=independent"):
        load(BASE + ["experiment=none", "data.teacher_view=weak", "data.teacher_crop=shared"])


# SimReg's view flags (main.py) as dataloader.py get_train_loader builds them: TwoCropsTransform gives the student
# (im_q) the second transform's view and the teacher (im_t) the first's, both the student's with --single_aug;
# without a flag both are augmentation_strong. As (data.augment, data.teacher_view, data.teacher_crop).
SIMREG_VIEWS = {
    "--single_aug --weak_weak": ("weak", "same", "shared"),
    "--single_aug": ("strong", "same", "shared"),
    "--weak_weak": ("weak", "weak", "independent"),
    "--weak_strong": ("strong", "weak", "independent"),
}
# SimReg Table 7 (arXiv 2201.05131), MoCo-v2 R50 -> ResNet-18, 1-NN / 20-NN / linear, by those flags.
TABLE_7 = {  # linear / 20-NN / 1-NN
    "--single_aug --weak_weak": "65.1 / 59.9 / 54.8",
    "--single_aug": "64.3 / 59.0 / 53.4",
    "--weak_weak": "64.6 / 59.8 / 54.7",
    "--weak_strong": "62.0 / 56.5 / 51.1",
    "no view flag": "61.4 / 56.0 / 50.3",
}


def table_7_rows() -> list[list[str]]:
    """The cells of the README's table of Table 7 overrides, one list per row."""
    lines = (Path(__file__).parents[1] / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("| SimReg Table 7 row"))
    rows = [line.strip() for line in itertools.takewhile(lambda line: line.strip().startswith("|"), lines[start + 2 :])]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def test_readme_table_7_overrides_compose_into_simregs_views():
    """Each row of the README's Table 7 table: its overrides on experiment=simreg_r50_r18 give the views that its
    SimReg flags build, and its figures are the paper's; the row without overrides says why."""
    rows = table_7_rows()
    flags = [next(f for f in TABLE_7 if f"({f}" in setting or f"(`{f}`" in setting) for setting, _, _ in rows]
    assert flags == list(TABLE_7)  # every row once, in the paper's order
    for flag, (_, overrides, figures) in zip(flags, rows):
        assert figures == f"{TABLE_7[flag]} (Table 7)", flag
        if flag not in SIMREG_VIEWS:
            assert overrides.startswith("not available"), flag
            continue
        args = [] if overrides == "none" else overrides.strip("`").split()
        cfg = load(BASE + ["experiment=simreg_r50_r18", *args]).data
        assert (cfg.augment, cfg.teacher_view, cfg.teacher_crop) == SIMREG_VIEWS[flag], flag


RECIPES = [e for e in options("experiment") if e not in ("demo", "none")]


@pytest.mark.parametrize("experiment", RECIPES)
def test_recipes_train_on_their_papers_view_batch_and_schedule(experiment):
    overrides = (
        ["teachers.0.checkpoint=random", "teachers.1.checkpoint=random"]
        if experiment == "simreg_multi"
        else [
            "teacher.checkpoint=random",
            "teacher.cache=/c" if experiment.endswith("_cached") else "teacher.cache=null",
        ]
    )
    cfg = load(["trainer.out_dir=/tmp/x", "data.root=/d", f"experiment={experiment}"] + overrides)
    assert (cfg.optim.recipe_batch, cfg.optim.schedule) == (256, "epoch")
    if experiment.startswith("seed_"):  # SEED's main.py: mocov2_aug (swav_aug at scale 0.14-1), warmup 5, cosine
        assert cfg.data.augment == "strong" and cfg.optim.warmup_epochs == 5 and cfg.loss.name == "seed"
        assert cfg.data.scale == ([0.14, 1.0] if "swav" in experiment else [0.2, 1.0])
    else:  # SimReg's run.sh: --single_aug --weak_weak, no warmup
        assert cfg.data.augment == "weak" and cfg.optim.warmup_epochs == 0 and cfg.loss.name == "simreg"


@pytest.mark.parametrize("experiment", RECIPES)
def test_every_recipe_names_its_teacher_and_the_papers_figure(experiment):
    comment = "\n".join(
        line
        for line in (CONFIGS / "experiment" / f"{experiment}.yaml").read_text().splitlines()
        if line.startswith("#")
    )
    assert "Teacher" in comment or "teachers" in comment
    assert "figure" in comment and ("not reported" in comment or "Table" in comment or "README" in comment)
    assert "Followed" in comment or "as simreg_r50_r18" in comment or "as seed_r50_effb0" in comment


def test_multi_teacher_names_and_heads():
    cfg = load(
        [
            "trainer.out_dir=/tmp/x",
            "data.root=/d",
            "experiment=simreg_multi",
            "teachers.0.checkpoint=random",
            "teachers.1.checkpoint=random",
            "teachers.1.weight=3",
        ]
    )
    assert [t.name for t in cfg.teachers] == ["mocov2", "dino"]
    assert [t.weight for t in cfg.teachers] == [1.0, 3.0]


def test_misspelled_override_fails_clearly():
    with pytest.raises(ConfigCompositionException, match="epocs"):
        load(BASE + ["trainer.epocs=3"])
    with pytest.raises(ConfigCompositionException, match="resnet1800"):
        load(BASE + ["student=resnet1800"])


def test_bad_values_name_the_key():
    with pytest.raises(ValueError, match="loss.name"):
        load(BASE + ["loss.name=simregg"])
    with pytest.raises(ValueError, match="trainer.precision"):
        load(BASE + ["trainer.precision=fp8"])
    with pytest.raises(ValueError, match="eval.precision='fp64' is not one of fp32, bf16, fp16"):
        load(BASE + ["eval.precision=fp64"])
    with pytest.raises(ValueError, match="data.scale"):
        load(BASE + ["data.scale=[0.5,0.2]"])


def test_missing_required_values():
    with pytest.raises(ValueError, match="teacher.checkpoint"):
        load(["experiment=none", "data.root=/d", "trainer.out_dir=/tmp/x"])
    with pytest.raises(ValueError, match="teachers.1.checkpoint"):
        load(["experiment=simreg_multi", "data.root=/d", "trainer.out_dir=/tmp/x", "teachers.0.checkpoint=random"])
    with pytest.raises(ValueError, match="data.root"):
        load(["experiment=none", "teacher.checkpoint=random", "trainer.out_dir=/tmp/x"])


def test_precision_auto_is_resolved_to_what_the_device_computes_in():
    """auto: bf16 on CUDA and CPUs with native bf16 (oneDNN says which), else fp32; explicit choices are kept."""
    native = torch.cuda.is_available() or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    none = BASE + ["experiment=none"]  # the default experiment, the demo, sets fp32 itself
    assert load(none).trainer.precision == ("bf16" if native else "fp32")
    assert load(BASE).trainer.precision == "fp32"
    assert load(none + ["trainer.device=cpu"]).trainer.precision == (
        "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    )
    assert load(BASE + ["trainer.precision=bf16", "trainer.device=cpu"]).trainer.precision == "bf16"
    assert load(BASE + ["experiment=seed_r50_effb0"]).trainer.precision == "fp16"  # the recipe's own


MULTI = ["trainer.out_dir=/tmp/x", "data.root=/d", "experiment=simreg_multi"]
MULTI += ["teachers.0.checkpoint=random", "teachers.1.checkpoint=random"]
OPTIM_KEYS = "name, base_lr, momentum, weight_decay, schedule, warmup_epochs, min_lr, recipe_batch"


@pytest.mark.parametrize(
    "overrides, says",
    [
        (["+optim.lrr=0.1"], f"optim.lrr is not a setting (optim has: {OPTIM_KEYS}; did you mean optim.min_lr or "),
        (["++optim.lrr=0.1"], "optim.lrr is not a setting (optim has: name, base_lr, "),
        (["+foo=1"], "foo is not a setting (the config's top level has: name, teacher, teachers, student, head, "),
        (["++trainer.epoch=3"], "trainer.epoch is not a setting (trainer has: epochs, precision, "),
        (["+teacher.bogus=1"], "teacher.bogus is not a setting (teacher has: arch, checkpoint, format, "),
        (["+data.small_patch=96"], "data.small_patch is not a setting (data has: loader, root, "),
        (MULTI[2:] + ["+teachers.1.bogus=1"], "teachers.1.bogus is not a setting (teachers.1 has: arch, checkpoint, "),
    ],
    ids=["plus", "plus_plus", "top_level", "plus_plus_trainer", "teacher", "data", "in_the_teachers_list"],
)
def test_keys_added_past_the_settings_are_refused(overrides, says):
    """hydra adds any key given with + or ++ (and suggests +key= for a key it does not know); the settings would
    drop it without a word: +optim.lrr=0.1 ran with the default lr."""
    with pytest.raises(ValueError) as raised:
        load(BASE + overrides)
    assert says in str(raised.value)
    assert "fix its name or remove it" in str(raised.value)


def test_a_key_without_plus_and_in_an_experiment_file_is_refused_by_hydra(tmp_path):
    with pytest.raises(ConfigCompositionException, match="Could not override 'optim.lrr'"):
        load(BASE + ["optim.lrr=0.1"])
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "typo.yaml").write_text("# @package _global_\noptim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigCompositionException) as raised:
        load(BASE + [f"hydra.searchpath=[file://{tmp_path}]", "experiment=typo"])
    assert "Key 'lrr' not in 'OptimConfig'" in str(raised.value) and "full_key: optim.lrr" in str(raised.value)


def test_hydra_keys_are_not_settings():
    cfg = load(BASE + ["hydra.job.chdir=false", "+hydra.job.env_set.FASTREG_X=1", "++hydra.verbose=true"])
    assert cfg.optim.base_lr > 0


@pytest.mark.parametrize(
    "override, says",
    [
        ("eval.knn_k=0", "eval.knn_k must be >= 1 (the neighbours that vote), got 0"),
        ("eval.knn_k=-5", "eval.knn_k must be >= 1 (the neighbours that vote), got -5"),
        ("eval.knn_t=0", "eval.knn_t must be > 0, got 0.0"),
        ("eval.batch_size=0", "eval.batch_size must be > 0, got 0"),
        ("eval.workers=-1", "eval.workers must be >= 0, got -1"),
    ],
    ids=["knn_k_0", "knn_k_negative", "knn_t_0", "batch_size_0", "workers_negative"],
)
def test_eval_settings_are_checked_before_training(override, says):
    with pytest.raises(ValueError) as raised:
        load(BASE + [override])
    assert says in str(raised.value)


def test_small_patches_larger_than_the_crop_are_refused():
    seed = BASE + ["experiment=none", "loss=seed", "data.crop_size=40"]
    with pytest.raises(ValueError) as raised:
        load(seed + ["data.small_patches=6", "data.small_patch_size=400"])
    assert str(raised.value).startswith("data.small_patch_size=400 is larger than data.crop_size=40: ")
    assert str(raised.value).endswith("set data.small_patch_size <= 40")
    assert load(seed + ["data.small_patches=6", "data.small_patch_size=40"]).data.small_patch_size == 40
    assert load(seed + ["data.small_patch_size=400"]).data.small_patches == 0  # no patches: the size is unused
