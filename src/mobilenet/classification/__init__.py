"""Image classification, the task of every MobileNet paper's ImageNet tables.

* :mod:`.task`: training on the engine (image folders, tar shards, built-in digit sets;
  cross-entropy; top-1 and top-5);
* :mod:`.predict`: a trained classifier of any file format loaded with its card
  (:func:`~.predict.load_trained`), evaluated (:func:`~.predict.evaluate_on`) and run on
  images (:func:`~.predict.predict`) by the engine measured fastest here.

The classifiers themselves are :mod:`mobilenet.models`; the detectors and segmentation
models build on them in :mod:`mobilenet.detection` and :mod:`mobilenet.segmentation`.
"""
