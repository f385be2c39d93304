"""Output bytes pinned: the tiny synthetic checkpoint converted with both scale policies and all three layouts must
hash to the digests below, recorded before Path A became a package around one shard writer (issue 17). A change
of any output byte fails here; one that is meant must update these digests and say why in its commit."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from nvfp4kit.checkpoint import INDEX_NAME, open_checkpoint
from nvfp4kit.convert import Settings, convert
from nvfp4kit.plan import Options, build_plan

SHARD_SIZE = 3 * 10**6  # several output shards: offsets and shard boundaries are pinned too

# (layout, scale policy) -> file -> sha256 of its bytes. Files: every safetensors shard, the index, config.json and
# hf_quant_config.json where the layout has one (not the report: it holds timings; not the card: it names paths).
PINNED: dict[tuple[str, str], dict[str, str]] = {
    ('compressed-tensors', 'auto'): {
        'config.json': 'c2c2930154260c9d17c5d514b6ace1b486bdcbf52845657165d920f76cd74b12',
        'model-00001-of-00010.safetensors': '4d8f5ed9966b06024124c7e3631fc6a5992ba1fc32be5c89a2e629ca20491b6b',
        'model-00002-of-00010.safetensors': 'daa80ba8f619e9d86277907a07aed8ca2ab151bcdfc28cf86e3bf9b43c5602bc',
        'model-00003-of-00010.safetensors': '734889bbe949d2fb735ff006a0e0eb22c6ec90037998a27f88e108637a34e314',
        'model-00004-of-00010.safetensors': '6b947b3818dcb9dd63e06af3544db9ac7e8ce850260d0e3e2652ba2f81ef298c',
        'model-00005-of-00010.safetensors': '65c02a690e151404cc2eaa37eb5ac545e5f2467701b33540085fd909c8a078aa',
        'model-00006-of-00010.safetensors': '3a91b3174b71dd4f5c508ff9bbca51284b85066a8178ff2f2a344260c7ac4086',
        'model-00007-of-00010.safetensors': 'c2250f0d06e175eae15ce26c07cb85ad21b162413d7b8e67b5d8f121a1ace6cb',
        'model-00008-of-00010.safetensors': '8e0e8c6eb3e6e71c919d156d84757a07622cdc9b667d520ba0d456a8178e6876',
        'model-00009-of-00010.safetensors': '111d40db9de2199f29b562aee87aaf6b327b0a12e29ebaf668373fa91e344ec6',
        'model-00010-of-00010.safetensors': 'faa9c3666e74b0e3c2ea5305548fd4544f0855fe3b7de22e977cc219c047d0c5',
        'model.safetensors.index.json': '85928e872e0da5f1777db78e06d0b65382bb007c9581245abfd6cf5b47de378c',
    },
    ('compressed-tensors', 'reference'): {
        'config.json': 'c2c2930154260c9d17c5d514b6ace1b486bdcbf52845657165d920f76cd74b12',
        'model-00001-of-00010.safetensors': '4d8f5ed9966b06024124c7e3631fc6a5992ba1fc32be5c89a2e629ca20491b6b',
        'model-00002-of-00010.safetensors': 'f7932f02e3c1d8e025c1d63e6c064ae6e44efa0342e25875d7b4a06277f7d0f8',
        'model-00003-of-00010.safetensors': 'c79a0bb20d40635cb36caf90cf26a764af932e91ca906fa6d32ef59fedd75f12',
        'model-00004-of-00010.safetensors': '6b947b3818dcb9dd63e06af3544db9ac7e8ce850260d0e3e2652ba2f81ef298c',
        'model-00005-of-00010.safetensors': 'e1a880430bb669e9f04a30e852c72b9bd5d550f1be5cc7df3e2d45e5088dc1ca',
        'model-00006-of-00010.safetensors': 'ffafd0935c89c45cc5132c24d86f3d6b147d9ddeec6b7ff7d119a2e30810456b',
        'model-00007-of-00010.safetensors': 'c2250f0d06e175eae15ce26c07cb85ad21b162413d7b8e67b5d8f121a1ace6cb',
        'model-00008-of-00010.safetensors': '4c04901efd28204a1dce2f174e4dc0bd66ed33f0bbddff24f34ccc36f4b5cd67',
        'model-00009-of-00010.safetensors': '8431bb7223c36ade096d0663c8befc152fd60c5803df2cda36fcfa5d79417d4d',
        'model-00010-of-00010.safetensors': 'faa9c3666e74b0e3c2ea5305548fd4544f0855fe3b7de22e977cc219c047d0c5',
        'model.safetensors.index.json': '85928e872e0da5f1777db78e06d0b65382bb007c9581245abfd6cf5b47de378c',
    },
    ('modelopt', 'auto'): {
        'config.json': '4ed774bd2560f7a502f48d0a2d689b8f23a1676a31b2bd1be3c4cd7a260bf295',
        'hf_quant_config.json': '08a37620748d939bdb516c4fb610f962a8a78864fa20c2bad41c85a3c4ee71c9',
        'model-00001-of-00010.safetensors': 'e143893e22a0eda7d80305c42bf03efb056319df8801350e030e5e1f15e23d1b',
        'model-00002-of-00010.safetensors': '3a33120e72fedf354fcd08a92bd71c7e8567b7990fccbcfac01ce27cfbd4929b',
        'model-00003-of-00010.safetensors': '00c485f4853e7895dea67ffbf8d5337ee53ed30e8e09ae396760030b3bf47146',
        'model-00004-of-00010.safetensors': '8efc31dbb0f158f40e88fd746a1d753d639abb419dc6ebba2a212f834565c6fd',
        'model-00005-of-00010.safetensors': '8ec9e90640d4f44379980aa4c985688f18cd0a660fc0cb7ef63a45205b0bda21',
        'model-00006-of-00010.safetensors': 'f1fd87580e64ce85e4319a8bb9c0a108bdfe54ec6711be78e650fbdc8abc28d0',
        'model-00007-of-00010.safetensors': 'fc6e88b8ab0a85f7b9b6537c1df6084032f9c1010fe4b4ff8e380b950fdbef52',
        'model-00008-of-00010.safetensors': 'e289b7d40e0acea576d8c2f07e5cd80d6291b34fabc448aaad6371ff292d02c6',
        'model-00009-of-00010.safetensors': '146b5b8b666167f1db76a088245f5d07c55b01f5bfd48ab0eba9ac954071611b',
        'model-00010-of-00010.safetensors': 'faa9c3666e74b0e3c2ea5305548fd4544f0855fe3b7de22e977cc219c047d0c5',
        'model.safetensors.index.json': 'e2a94407c94337dbd23d582a540859aa1d2b25edb640b4e6bb7682a10497c824',
    },
    ('modelopt', 'reference'): {
        'config.json': '4ed774bd2560f7a502f48d0a2d689b8f23a1676a31b2bd1be3c4cd7a260bf295',
        'hf_quant_config.json': '08a37620748d939bdb516c4fb610f962a8a78864fa20c2bad41c85a3c4ee71c9',
        'model-00001-of-00010.safetensors': 'e143893e22a0eda7d80305c42bf03efb056319df8801350e030e5e1f15e23d1b',
        'model-00002-of-00010.safetensors': '24f967dced9423b44b4bfefce1f47b9caab9a681e60d0f0f3f25ad9b83bcb3c2',
        'model-00003-of-00010.safetensors': 'f078ccaefc38ff1fa1a56359d67db70c7be1a050a7bfab8448010ad0ad7cfce0',
        'model-00004-of-00010.safetensors': '8efc31dbb0f158f40e88fd746a1d753d639abb419dc6ebba2a212f834565c6fd',
        'model-00005-of-00010.safetensors': 'bbd5edf09446285584d2dbd6cc353edffa4edf0151cda1958e1cc8d72531c3b7',
        'model-00006-of-00010.safetensors': '9f7aeaebab70f3ce6d478ad13c5bdc2ad256592af4ec5d460298e44e5a398826',
        'model-00007-of-00010.safetensors': 'fc6e88b8ab0a85f7b9b6537c1df6084032f9c1010fe4b4ff8e380b950fdbef52',
        'model-00008-of-00010.safetensors': 'bc924cae7c0efe9ec7432ec0a04f6ab827fd8e8cc24f82147dcedd7fdd0a1387',
        'model-00009-of-00010.safetensors': 'fdc404789a062afa5720409d4b92bd7b98a9c5ad68de8340f064d71a8e690931',
        'model-00010-of-00010.safetensors': 'faa9c3666e74b0e3c2ea5305548fd4544f0855fe3b7de22e977cc219c047d0c5',
        'model.safetensors.index.json': 'e2a94407c94337dbd23d582a540859aa1d2b25edb640b4e6bb7682a10497c824',
    },
    ('nvidia', 'auto'): {
        'config.json': '06cccba70bbdb32a5ce6f43a83bef337014251416c60db1b8c90256a546bab87',
        'hf_quant_config.json': '15dd34f75889244a3da3c9cc9d7c84eb510c7786cd1ac49f21de0fdb069db336',
        'model-00001-of-00010.safetensors': 'ddcf652901e064dcc7d90dad91f7c908ea1fec5e6c71d8d11169616c034ae853',
        'model-00002-of-00010.safetensors': '76f686aaf9a337c5a1fda9fd88897d7df3cfc508589f581a5244ed4ab90972a3',
        'model-00003-of-00010.safetensors': '66cd0d817be2339868da640d4a2a934c19ae807e6ada4a231c2d04f522ba124c',
        'model-00004-of-00010.safetensors': '1517b48ec302cdc5527335e460fe345403b37a9bb8ef43aa314142a9d1574077',
        'model-00005-of-00010.safetensors': '64fe09b50d48bdaac466bd275d16e1b00cb6f11814ca9e39037ad5012ab91948',
        'model-00006-of-00010.safetensors': 'ca325d40923e81757b6518c667013583091385492ac13f118eb25821cfb005bf',
        'model-00007-of-00010.safetensors': '705de4b394f682765cdde463091c1e1cdd8aa7995d73c78b12342302d3b61731',
        'model-00008-of-00010.safetensors': '438b1cab552f3ee1ef8b486dc49f78f324e88d2a0d163202e2570acb15aee537',
        'model-00009-of-00010.safetensors': '91263fb6a12cabd73a4c9df9d44bf8d7949e76e72f6da4179dfcad67ce572af7',
        'model-00010-of-00010.safetensors': 'faa9c3666e74b0e3c2ea5305548fd4544f0855fe3b7de22e977cc219c047d0c5',
        'model.safetensors.index.json': '2e77c7beb6ad0bcefe2d01be310fd5402b950597cde7c55e9df0aecc543dfcb5',
    },
    ('nvidia', 'reference'): {
        'config.json': '06cccba70bbdb32a5ce6f43a83bef337014251416c60db1b8c90256a546bab87',
        'hf_quant_config.json': '15dd34f75889244a3da3c9cc9d7c84eb510c7786cd1ac49f21de0fdb069db336',
        'model-00001-of-00010.safetensors': 'ddcf652901e064dcc7d90dad91f7c908ea1fec5e6c71d8d11169616c034ae853',
        'model-00002-of-00010.safetensors': '78fade630ccbe10423141b566376aa5b3528a507f8cd1f12b0357022bb3c902d',
        'model-00003-of-00010.safetensors': 'ecc822585efd920ab8c0477ce665daa8d484d563846caed01e4d41f8a10e58d7',
        'model-00004-of-00010.safetensors': '1517b48ec302cdc5527335e460fe345403b37a9bb8ef43aa314142a9d1574077',
        'model-00005-of-00010.safetensors': 'e37132435e3fa7e58a8905b83d46ea83d6e623080d875830457a67c95e765eaf',
        'model-00006-of-00010.safetensors': 'cc4835f9a384d3f0c231def3547545bbf5b02a4deb619e8dac05f0ec8249e4d8',
        'model-00007-of-00010.safetensors': '705de4b394f682765cdde463091c1e1cdd8aa7995d73c78b12342302d3b61731',
        'model-00008-of-00010.safetensors': 'a9f7eeb3acf23cf27192b3ca5cde8d0b7df336356b82ba0804676546f745fe3d',
        'model-00009-of-00010.safetensors': 'a05b32baeeb41232a0a354963d73ab80f74b09bbff50f824828536646e9821f5',
        'model-00010-of-00010.safetensors': 'faa9c3666e74b0e3c2ea5305548fd4544f0855fe3b7de22e977cc219c047d0c5',
        'model.safetensors.index.json': '2e77c7beb6ad0bcefe2d01be310fd5402b950597cde7c55e9df0aecc543dfcb5',
    },
}


def activation_scales(src: str, path: str) -> str:
    """An amax for every module the plan quantizes, 1.0, 2.0, ... in name order: fixed, so the bytes are too."""
    plan = build_plan(open_checkpoint(src), Options(), None)
    modules = sorted(m for m, a in plan.actions.items() if a == "quantize")
    with open(path, "w") as f:
        json.dump({"input_amax": {m: 1.0 + i for i, m in enumerate(modules)}}, f)
    return path


def digests(folder: str) -> dict[str, str]:
    names = sorted(n for n in os.listdir(folder)
                   if n.endswith(".safetensors") or n in (INDEX_NAME, "config.json", "hf_quant_config.json"))
    out = {}
    for name in names:
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.mark.parametrize("layout, policy, writes", [
    *((layout, policy, "mapped") for layout in ("compressed-tensors", "modelopt", "nvidia") for policy in ("auto", "reference")),
    ("compressed-tensors", "auto", "pwrite")])
def test_output_bytes_are_pinned(tiny_src, tmp_path, monkeypatch, layout, policy, writes):
    """Both ways the shard writer writes (write.ShardFile: a mapped file, or pwrite) give the pinned bytes (the
    writer does not depend on the layout: one layout is enough for pwrite)."""
    monkeypatch.setenv("NVFP4KIT_PWRITE", "1" if writes == "pwrite" else "0")
    scales = activation_scales(tiny_src, str(tmp_path / "act.json")) if layout == "nvidia" else None
    dst = str(tmp_path / "out")
    convert(tiny_src, dst, Options(format=layout, scale_policy=policy, max_shard_size=SHARD_SIZE), Settings(),
            activation_scales=scales)
    assert digests(dst) == PINNED[(layout, policy)]


def test_the_shard_writer_maps_its_file_where_the_filesystem_reserves_space(tmp_path, monkeypatch):
    """The "mapped" cases above test the mapped writer only if it maps here; and the switch turns it off."""
    from nvfp4kit.write import ShardFile

    monkeypatch.delenv("NVFP4KIT_PWRITE", raising=False)
    for env, mapped in ((None, True), ("1", False)):
        if env:
            monkeypatch.setenv("NVFP4KIT_PWRITE", env)
        f = ShardFile(str(tmp_path / "x"), 1 << 20)
        try:
            assert (f._map is not None) == mapped and os.path.getsize(tmp_path / "x") == (1 << 20 if mapped else 0)
        finally:
            f.close()
