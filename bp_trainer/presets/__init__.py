"""Generation presets for the "BP presets" Script (txt2img/img2img): clip skip, ENSD, sampling and hires fix.

Pure code (no WebUI imports); the Script in `scripts/bp_presets.py` only calls it. One module per job:

* `bp_trainer.presets.preset`: what a preset is (`Preset`, `Hires`), the built-ins, validation of a preset entry,
  and the preset an infotext's parameter line makes (`preset_from_infotext`).
* `bp_trainer.presets.store`: the user presets file (YAML): load, atomic save, add, replace, delete, find.
* `bp_trainer.presets.apply`: applying a preset to a WebUI processing object and putting the settings back.

The infotext format itself (quoting, parsing, WebUI compatibility rules) is `bp_trainer.infotext`.
"""
