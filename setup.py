"""ablax: a JAX/Flax NNX trainer for decoder-only transformer ablations."""

import setuptools

setuptools.setup(
    name='ablax',
    version='0.1.0',
    description='Decoder-only transformer ablations in JAX/Flax NNX on TPU and GPU',
    python_requires='>=3.11',
    packages=setuptools.find_packages(include=[
        'configs', 'model', 'model.*', 'train', 'train.*', 'data', 'data.*',
        'align', 'align.*', 'launch', 'launch.*']),
    package_data={'launch': ['templates/*']},
    install_requires=[
        'jax>=0.10.2',
        'flax>=0.12.8',
        'optax>=0.2.8',
        'orbax-checkpoint>=0.11',
        'grain>=0.2.18',
        'ml-collections>=1.1',
        'tensorboard>=2.20',
        'absl-py>=2.3',
        'numpy>=2.0',
        'safetensors>=0.6',
        'matplotlib>=3.9',
        'tqdm>=4.66',
        'scipy>=1.11',     # launch.compare statistics, launch.fit
        # Corpora: Parquet input, byte-level BPE training, token shards.
        'pyarrow>=14',
        'tokenizers>=0.21',
        'array-record>=0.8',
    ],
    extras_require={
        # Tests; torch only for the Hugging Face parity tests (CPU build).
        'test': ['pytest>=8', 'pytest-xdist>=3.6', 'sentencepiece>=0.2',
                 'tokenizers>=0.21', 'array-record>=0.8', 'torch==2.13.0',
                 'transformers>=4.56'],
        # The model and kernel tests on the newest jax (no torch needed).
        'test-core': ['pytest>=8', 'pytest-xdist>=3.6'],
    },
    entry_points={'console_scripts': [
        'ablax-train=train.__main__:run',
        'ablax-dpo=align.__main__:run',
        'ablax-sweep=launch.sweep:run',
        'ablax-compare=launch.compare:run',
    ]},
)
