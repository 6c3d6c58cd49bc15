"""islkeras in napari: the npe2 plugin (``napari.yaml``, entry point group ``napari.manifest``, extra
``pip install 'islkeras[napari]'``).

* ``widgets.py``: the dock widgets "Predict fluorescence" (a run folder or SavedModel + the image layer(s)
  of its input channels -> one image layer per target channel) and "Segment nuclei" (a segmentation run ->
  a labels layer), both running the tiled prediction in a worker thread with a progress bar;
* ``layers.py``: napari layers <-> the model's arrays (planes, pixel size from the layer's scale, the
  layers' colormaps and contrast), without Qt;
* ``reader.py``: opens islkeras prediction TIFFs (``*_prediction.tif``, one layer per channel, named by the
  channel) and, through ``islkeras.data.formats``, microscope files (one layer per channel).

The last step of the flow: it may import every other step (inference for prediction, segmentation for the
labels); nothing in islkeras imports it. Only this folder imports napari or Qt.
"""
