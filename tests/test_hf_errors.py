"""model.hf: bad Hugging Face folders fail with errors that name the problem."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from model import hf
from tests import hf_families


def _saved(tmp_path, family='llama'):
  hf_families.make_hf_model(family).save_pretrained(tmp_path)
  return str(tmp_path)


def _edit_config(path, **changes):
  with open(os.path.join(path, 'config.json')) as f:
    cfg = json.load(f)
  cfg.update(changes)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(cfg, f)


def test_unsupported_architecture(tmp_path):
  path = _saved(tmp_path)
  _edit_config(path, model_type='falcon', architectures=['FalconForCausalLM'])
  with pytest.raises(hf.HFError, match="unsupported model_type 'falcon'.*FalconForCausalLM"):
    hf.load(path)


def test_unmapped_field(tmp_path):
  path = _saved(tmp_path)
  _edit_config(path, logit_scale=0.5)
  with pytest.raises(hf.HFError, match="field 'logit_scale'.*no ablax mapping"):
    hf.load(path)


def test_unsupported_value(tmp_path):
  path = _saved(tmp_path, 'gpt2')
  _edit_config(path, scale_attn_by_inverse_layer_idx=True)
  with pytest.raises(hf.HFError, match='scale_attn_by_inverse_layer_idx=True'):
    hf.load(path)


def test_missing_shard(tmp_path):
  path = _saved(tmp_path)
  tensors = load_file(os.path.join(path, 'model.safetensors'))
  os.remove(os.path.join(path, 'model.safetensors'))
  names = sorted(tensors)
  shards = {'model-00001-of-00002.safetensors': names[:5],
            'model-00002-of-00002.safetensors': names[5:]}
  weight_map = {n: f for f, ns in shards.items() for n in ns}
  with open(os.path.join(path, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {}, 'weight_map': weight_map}, f)
  save_file({n: tensors[n] for n in names[:5]},
            os.path.join(path, 'model-00001-of-00002.safetensors'))
  with pytest.raises(hf.HFError, match='shard model-00002-of-00002.safetensors'):
    hf.load(path)
  # With both shards present, the sharded folder loads.
  save_file({n: tensors[n] for n in names[5:]},
            os.path.join(path, 'model-00002-of-00002.safetensors'))
  cfg, _ = hf.load(path)
  assert cfg.model.num_layers == 2


def test_shape_mismatch(tmp_path):
  path = _saved(tmp_path)
  file = os.path.join(path, 'model.safetensors')
  tensors = load_file(file)
  name = 'model.layers.1.mlp.up_proj.weight'
  tensors[name] = np.zeros((65, 32), np.float32)
  save_file(tensors, file)
  with pytest.raises(hf.HFError, match=r"model.layers.1.mlp.up_proj.weight.*\(65, 32\).*blocks.1.mlp.wi_up"):
    hf.load(path)


def test_missing_tensor(tmp_path):
  path = _saved(tmp_path)
  file = os.path.join(path, 'model.safetensors')
  tensors = load_file(file)
  del tensors['model.layers.0.self_attn.k_proj.weight']
  save_file(tensors, file)
  with pytest.raises(hf.HFError, match="'model.layers.0.self_attn.k_proj.weight' is missing"):
    hf.load(path)


def test_export_refuses_memory_tokens(tmp_path):
  import configs
  import model as model_lib
  from flax import nnx
  cfg = configs.load('configs/llama.py:tiny', ['model.num_memory_tokens=2'])
  decoder = model_lib.Decoder(cfg.model, rngs=nnx.Rngs(0))
  with pytest.raises(hf.HFError, match='num_memory_tokens=2'):
    hf.save(cfg, decoder, str(tmp_path))


def test_export_refuses_mup(tmp_path):
  import configs
  import model as model_lib
  from flax import nnx
  cfg = configs.load('configs/llama.py:tiny', ['model.mup_base_width=32'])
  decoder = model_lib.Decoder(cfg.model, rngs=nnx.Rngs(0))
  with pytest.raises(hf.HFError, match='mup_base_width=32'):
    hf.save(cfg, decoder, str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, 'config.json'))


@pytest.mark.parametrize('override, text', [
    ("model.layer_pattern='LA'", "layer_pattern='LA'"),
    ('model.mtp_depth=1', 'mtp_depth=1'),
])
def test_export_refuses_layers_no_family_holds(tmp_path, override, text):
  """A Gated DeltaNet hybrid or MTP modules: refused, nothing written (an
  export that dropped them would compute another function)."""
  import configs
  import model as model_lib
  from flax import nnx
  cfg = configs.load('configs/llama.py:tiny', [override])
  decoder = model_lib.Decoder(cfg.model, rngs=nnx.Rngs(0))
  with pytest.raises(hf.HFError, match=text):
    hf.save(cfg, decoder, str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, 'config.json'))
