import os

from modules import paths

vae_path = os.path.abspath(os.path.join(paths.models_path, "VAE"))
vae_dict = {}


def refresh_vae_list():
    vae_dict.clear()
    if os.path.isdir(vae_path):
        for root, _, files in os.walk(vae_path):
            for f in sorted(files):
                if f.endswith((".ckpt", ".pt", ".safetensors")):
                    vae_dict[os.path.basename(f)] = os.path.join(root, f)
