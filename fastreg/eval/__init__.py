"""Evaluation of a frozen backbone, by the protocols of the papers fastreg reproduces: a CLI for students, and a
library for any nn.Module.

    python -m fastreg.eval runs/r18/ckpt_epoch0130.pt --linear simreg
    python -m fastreg.eval resnet18_simreg.pt --arch resnet18 --train-root train/ --val-root val/

    from fastreg.eval import knn, linear_eval
    knn(model, "train/", "val/")  # {"knn20_majority": ..., "knn20_weighted": ..., "nn1": ...}, the CLI's figures
    linear_eval(model, "train/", "val/", "simreg")  # top-1 %, the CLI's --linear simreg

k-NN (train images as the bank, val images as the queries, center crops), three figures:
  knn<k>_majority  SimReg's (eval_knn.py faiss_knn): the k nearest bank features by L2 distance between
                   L2-normalized features (the same order as cosine similarity), one vote each; the most
                   votes win, a tie goes to a random one of the tied classes (here drawn from a fixed seed:
                   see _majority_vote).
  knn<k>_weighted  DINO / InstDisc: each of the k nearest adds exp(cos / t) to its class.
  nn1              the label of the nearest one (SimReg's 1-NN: its majority vote at k=1).
Linear evaluation (--linear, one or more of):
  simreg  SimReg's eval_linear.py: a fresh RandomResizedCrop + flip of every training image each epoch
          through the frozen backbone, L2-normalized, standardized by the train set's fixed mean and
          variance, then a Linear; SGD lr 0.01, 40 epochs, lr x0.1 at 15 and 30.
  moco    SEED's main_lincls.py (MoCo's): the same fresh crops, the raw feature into a Linear; SGD lr 30
          x batch/256, weight decay 0, 100 epochs, lr x0.1 at 60 and 80.
  cached  the fast variant: CompRess's L2Norm -> BatchNorm1d -> Linear on cached center-crop features,
          40 epochs. No augmentation, so a little lower than simreg on ImageNet (SimReg's README says so
          of its own cached variant, --use_cache), but no pass through the backbone per epoch.
The linear figures are top-1 on the val set's center crops.

The CLI caches the raw center-crop features in --cache-dir (default: fastreg.files.cache_dir("features"),
$FASTREG_CACHE/features) per (weights, data folder, crop size, precision), so later runs and the linear
protocols reuse what k-NN extracted. `knn_eval`, which the trainer calls, never caches: its model changes
between calls.

The modules, by job:
  features       extract_features, folder_features: a frozen model's features of a loader's, or a folder's, images
  neighbours     the k-NN votes (knn_predict, knn_accuracy) and their evaluation of a model on folders (knn_eval,
                 knn_eval_run: the trainer's)
  feature_cache  cached_features: the CLI's features on disk
  linear         the linear protocols (linear_probe, RECIPES, simreg_head, moco_head, train_on_views, run_protocol)
  library        knn and linear_eval: any nn.Module backbone on an ImageFolder pair
  cli            python -m fastreg.eval: loading students and heads, the protocols the flags name, the table
"""

from fastreg.eval.cli import evaluate, load_head, load_student, main
from fastreg.eval.feature_cache import cached_features, weights_digest
from fastreg.eval.features import count_classes, extract_features, folder_features
from fastreg.eval.library import knn, linear_eval
from fastreg.eval.linear import (
    RECIPES,
    FullBatchNorm,
    LinearRecipe,
    augmented_views,
    linear_probe,
    make_probe,
    moco_head,
    run_protocol,
    simreg_head,
    train_on_views,
    tuned_recipe,
)
from fastreg.eval.neighbours import (
    SIM_ELEMENTS,
    TIE_SEED,
    knn_accuracy,
    knn_eval,
    knn_eval_run,
    knn_label,
    knn_predict,
    tie_order,
)

__all__ = [
    "RECIPES",
    "SIM_ELEMENTS",
    "TIE_SEED",
    "FullBatchNorm",
    "LinearRecipe",
    "augmented_views",
    "cached_features",
    "count_classes",
    "evaluate",
    "extract_features",
    "folder_features",
    "knn",
    "knn_accuracy",
    "knn_eval",
    "knn_eval_run",
    "knn_label",
    "knn_predict",
    "linear_eval",
    "linear_probe",
    "load_head",
    "load_student",
    "main",
    "make_probe",
    "moco_head",
    "run_protocol",
    "simreg_head",
    "tie_order",
    "train_on_views",
    "tuned_recipe",
    "weights_digest",
]
