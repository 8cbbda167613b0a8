"""Key alignment by resolution level, on hand-made key sets and on real nnU-Net networks from plans."""

from __future__ import annotations

import pytest
import torch

from fedfs.fl.align import align_sites, canonical_keys, decoder_depth, group_keys, group_name, sharing
from fedfs.errors import ConfigError


def plans_configuration(n_stages: int, network: str = "PlainConvUNet") -> dict:
    """A 2D configuration as nnU-Net's planner writes it into plans.json (64x64 -> 5, 256x256 -> 7 stages)."""
    features = [min(32 * 2 ** i, 512) for i in range(n_stages)]
    blocks = {"n_conv_per_stage": [2] * n_stages} if network == "PlainConvUNet" else \
        {"n_blocks_per_stage": [1, 3, 4, 6, 6, 6, 6][:n_stages]}
    return {
        "data_identifier": "nnUNetPlans_2d", "preprocessor_name": "DefaultPreprocessor", "batch_size": 12,
        "patch_size": [4 * 2 ** (n_stages - 1)] * 2, "median_image_size_in_voxels": [256, 256],
        "spacing": [1.0, 1.0], "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {}, "resampling_fn_seg_kwargs": {}, "resampling_fn_probabilities":
            "resample_data_or_seg_to_shape", "resampling_fn_probabilities_kwargs": {}, "batch_dice": True,
        "architecture": {
            "network_class_name": f"dynamic_network_architectures.architectures.unet.{network}",
            "arch_kwargs": {
                "n_stages": n_stages, "features_per_stage": features,
                "conv_op": "torch.nn.modules.conv.Conv2d", "kernel_sizes": [[3, 3]] * n_stages,
                "strides": [[1, 1]] + [[2, 2]] * (n_stages - 1), **blocks,
                "n_conv_per_stage_decoder": [2] * (n_stages - 1), "conv_bias": True,
                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
                "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
            },
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
    }


def network_shapes(n_stages: int, network: str = "PlainConvUNet") -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the network nnU-Net builds from those plans (on the meta device: no memory)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    cm = ConfigurationManager(plans_configuration(n_stages, network))
    with torch.device("meta"):
        net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                     cm.network_arch_init_kwargs_req_import, 1, 3, allow_init=False,
                                     deep_supervision=True)
    return {k: tuple(p.shape) for k, p in net.named_parameters()}


# ---- pure key arithmetic -------------------------------------------------------
def test_decoder_indices_become_resolution_levels():
    # Prepare: 3 decoder stages (a 4-stage net); decoder index 0 is next to the bottleneck
    keys = ["encoder.stages.0.w", "decoder.stages.0.w", "decoder.stages.2.w", "decoder.transpconvs.1.weight",
            "decoder.seg_layers.2.bias"]
    # Execute
    canon = canonical_keys(keys, "level")
    # Assert
    assert decoder_depth(keys) == 3
    assert canon == {
        "encoder.stages.0.w": "encoder.stages.0.w",
        "decoder.stages.0.w": "decoder.stages.r2.w",
        "decoder.stages.2.w": "decoder.stages.r0.w",
        "decoder.transpconvs.1.weight": "decoder.transpconvs.r1.weight",
        "decoder.seg_layers.2.bias": "decoder.seg_layers.r0.bias",
    }
    assert canonical_keys(keys, "name") == {k: k for k in keys}


def test_groups_carry_the_shape_and_unknown_modes_fail():
    assert group_name("a.b", (3, 1, 2)) == "a.b[3,1,2]" and group_name("s", ()) == "s[]"
    assert group_keys({"decoder.stages.0.w": (4,)}, "level") == {"decoder.stages.0.w": "decoder.stages.r0.w[4]"}
    with pytest.raises(ConfigError):
        canonical_keys(["a"], "fuzzy")


def test_align_sites_and_sharing_on_a_toy_pair():
    # Prepare: A has 2 decoder stages, B has 3; level 0 and 1 match in shape, B's level 2 is its own
    a = {"encoder.stages.0.w": (2,), "decoder.stages.0.w": (3,), "decoder.stages.1.w": (2,)}
    b = {"encoder.stages.0.w": (2,), "decoder.stages.0.w": (4,), "decoder.stages.1.w": (3,), "decoder.stages.2.w": (2,)}
    # Execute
    table = align_sites({"B": b, "A": a}, "level")
    by_level, by_name = sharing({"A": a, "B": b}, "level"), sharing({"A": a, "B": b}, "name")
    # Assert
    assert table["decoder.stages.r1.w[3]"] == {"A": "decoder.stages.0.w", "B": "decoder.stages.1.w"}
    assert table["decoder.stages.r2.w[4]"] == {"B": "decoder.stages.0.w"}
    assert (by_level["A"].shared_tensors, by_level["A"].shared_params) == (3, 7)
    assert (by_level["B"].shared_tensors, by_level["B"].tensors, by_level["B"].params) == (3, 4, 11)
    assert by_name["A"].shared_tensors == 1


# ---- real nnU-Net networks ---------------------------------------------------------
def test_real_5_and_7_stage_nets_share_44_by_name_and_88_by_level():
    # Prepare
    five, seven = network_shapes(5), network_shapes(7)
    # Execute
    by_name = sharing({"five": five, "seven": seven}, "name")
    by_level = sharing({"five": five, "seven": seven}, "level")
    # Assert
    assert (len(five), len(seven)) == (88, 128)
    assert by_name["five"].params == 7_766_828 and by_name["seven"].params == 33_473_330
    assert by_name["five"].shared_tensors == 44 and by_name["seven"].shared_tensors == 44
    assert by_level["five"].shared_tensors == 88 and by_level["five"].shared_params == 7_766_828
    assert by_level["seven"].shared_tensors == 88


def test_aligned_decoder_stages_are_the_same_resolution_in_both_nets():
    # Prepare
    five, seven = network_shapes(5), network_shapes(7)
    # Execute
    table = align_sites({"five": five, "seven": seven}, "level")
    pairs = {t["five"]: t["seven"] for t in table.values() if len(t) == 2}
    # Assert: 5-stage decoder stage i is at level 3-i, the 7-stage's stage i+2 is at level 5-(i+2)
    assert pairs["decoder.stages.0.convs.0.conv.weight"] == "decoder.stages.2.convs.0.conv.weight"
    assert pairs["decoder.transpconvs.3.weight"] == "decoder.transpconvs.5.weight"
    assert pairs["decoder.seg_layers.3.weight"] == "decoder.seg_layers.5.weight"
    assert pairs["encoder.stages.4.0.convs.1.conv.weight"] == "encoder.stages.4.0.convs.1.conv.weight"


def test_residual_encoder_unets_align_fully_too():
    five, seven = network_shapes(5, "ResidualEncoderUNet"), network_shapes(7, "ResidualEncoderUNet")
    by_level = sharing({"five": five, "seven": seven}, "level")
    by_name = sharing({"five": five, "seven": seven}, "name")
    assert by_level["five"].shared_tensors == len(five) > by_name["five"].shared_tensors
