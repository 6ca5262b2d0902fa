"""The papers' figures: each recipe's YAML and README's "Fidelity to the papers" table give the same ones.

A recipe states them on one comment line of a fixed format (they are not settings, so not config keys):
    # paper-figures (linear / 20-NN / 1-NN): 65.1 / 59.9 / 54.8 | SimReg Table 7, same image, weak/weak
each figure a number or "-" (none given), then the source. README's recipe table has a row per recipe whose
"paper: linear / 20-NN / 1-NN" cell holds the same three and whose "source" cell starts with the same source.
"""

import re
from pathlib import Path

import pytest

import fastreg.configs

EXPERIMENTS = Path(fastreg.configs.__file__).parent / "experiment"
README = Path(__file__).resolve().parents[1] / "README.md"
NOT_RECIPES = ("demo", "none")  # the embedded demo and the empty recipe reproduce no paper
FIGURE = r"(?:\d+\.\d|-)"
FIGURES = re.compile(rf"({FIGURE}) / ({FIGURE}) / ({FIGURE})")
YAML_LINE = re.compile(rf"# paper-figures \(linear / 20-NN / 1-NN\): {FIGURES.pattern} \| (\S.*)")
SECTION = "## Fidelity to the papers"
FIGURES_HEADER = "paper: linear / 20-NN / 1-NN"


def yaml_figures(text: str, where: str) -> tuple[tuple[str, str, str], str]:
    """((linear, 20-NN, 1-NN), source) from a recipe's one paper-figures line."""
    lines = [line for line in text.splitlines() if line.startswith("# paper-figures")]
    assert len(lines) == 1, f"{where}: {len(lines)} '# paper-figures' lines, want 1"
    match = YAML_LINE.fullmatch(lines[0])
    assert match, f"{where}: {lines[0]!r} is not '# paper-figures (linear / 20-NN / 1-NN): A / B / C | source'"
    return match.groups()[:3], match.group(4)


def cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def readme_figures(text: str) -> dict[str, tuple[tuple[str, str, str], str]]:
    """recipe -> ((linear, 20-NN, 1-NN), source cell) from the first table of the fidelity section."""
    section = text[text.index(SECTION) :]
    section = section[: section.index("\n## ", len(SECTION))]
    lines = section.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith("| recipe |"))
    header = cells(lines[top])
    figures_at, source_at = header.index(FIGURES_HEADER), header.index("source")
    out = {}
    for row in lines[top + 2 :]:
        if not row.startswith("|"):
            break
        row_cells = cells(row)
        recipe = row_cells[0].strip("`")
        match = FIGURES.fullmatch(row_cells[figures_at])
        assert match, f"README, recipe {recipe}: figures cell {row_cells[figures_at]!r} is not 'A / B / C'"
        out[recipe] = (match.groups(), row_cells[source_at])
    return out


def recipes() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS.glob("*.yaml") if p.stem not in NOT_RECIPES)


def test_readme_lists_every_recipe_once():
    assert sorted(readme_figures(README.read_text())) == recipes()


@pytest.mark.parametrize("recipe", recipes())
def test_recipe_yaml_figures_equal_the_readme_table(recipe):
    figures, source = yaml_figures((EXPERIMENTS / f"{recipe}.yaml").read_text(), f"{recipe}.yaml")
    readme_numbers, readme_source = readme_figures(README.read_text())[recipe]
    assert figures == readme_numbers, f"{recipe}: YAML {figures} vs README {readme_numbers}"
    assert readme_source == source or readme_source.startswith(source + ";"), (source, readme_source)


# Recipes on today's teachers (issue 25): no paper ran SimReg or SEED on them, so each states "not reported" with "-"
# for every figure, and names the published figures of other setups with their source or says they are not checked.
DINO_RECIPES = ("dinov3_vitl16_r50", "dinov3_vitl16_mbv3", "dinov2_vitg14_r18_cached")


@pytest.mark.parametrize("recipe", DINO_RECIPES)
def test_dino_recipes_say_not_reported_and_name_the_published_figures(recipe):
    path = EXPERIMENTS / f"{recipe}.yaml"
    assert recipe in recipes(), f"{path} is missing"  # the parametrized tests above only see the files that exist
    text = path.read_text()
    figures, source = yaml_figures(text, path.name)
    assert figures == ("-", "-", "-") and source.startswith("not reported"), (figures, source)
    comments = " ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
    assert "facebookresearch/dinov2's README" in comments or "facebookresearch/dinov2 README" in comments
    assert "arXiv 2508.10104" in comments and "figures not checked here" in comments  # DINOv3's ConvNeXt table


def test_a_recipe_without_its_line_or_with_two_is_refused():
    with pytest.raises(AssertionError, match="0 '# paper-figures' lines"):
        yaml_figures("# @package _global_\nname: x\n", "x.yaml")
    line = "# paper-figures (linear / 20-NN / 1-NN): - / - / - | not reported"
    with pytest.raises(AssertionError, match="2 '# paper-figures' lines"):
        yaml_figures(f"{line}\n{line}\n", "x.yaml")
    with pytest.raises(AssertionError, match="is not '# paper-figures"):
        yaml_figures("# paper-figures (linear / 20-NN / 1-NN): 65 / - / - | x\n", "x.yaml")  # 65 is not 65.0
