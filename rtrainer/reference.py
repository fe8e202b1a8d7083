# placeholder during build-out; see _ref_layer.py and _ref_misc.py
