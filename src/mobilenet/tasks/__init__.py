"""Tasks: what each adds to the training engine (:mod:`mobilenet.train.engine`).

* :mod:`.classification`: image folders and built-in digit sets, cross-entropy, top-1/5;
* :mod:`.detection`: COCO-format folders and mnist-det, the SSD loss, COCO mAP.

Each module holds its run config, its :class:`~mobilenet.train.engine.Task` and one
function that trains (``train``, ``train_detector``). The model's registered task picks
the module (``mobilenet train --model NAME``).
"""
