"""Data: download (URL or path, checksum, progress), safe archive reading, decoding, splits.

Two stages use this package: ``download`` (:func:`resnet.data.sources.download`) and
``split`` (:func:`resnet.data.split.prepare`); the later stages only read what split
wrote (:mod:`resnet.data.store`). One concern per module, imported from its module:
this file imports nothing, so a stage that only reads prepared files depends on
``store`` and ``errors`` alone, and DVC does not retrain when the download code changes.

* ``sources``: data.source (URL, file:// URL, path, folder), fetching, checksums, ``data/raw``;
* ``archives``: reading tar, zip and folders member by member, with an extractor's safety rules;
* ``tar_reader``: the hand-written tar header reader ``archives`` uses (29% of the split
  stage's time saved; benchmarks/results/split-2026-11-23.md), tarfile's streaming mode for the rest;
* ``datasets``: what an archive holds: CIFAR python batches, or an image folder's layout;
* ``encoded``: an image folder's encoded files, kept on disk (an archive's copied aside) and read when decoded;
* ``decode``: an image folder's files to one uint8 array, by :mod:`resnet.preprocess`'s path;
* ``split``: stratified, seeded splits, per-class caps, channel statistics, the split stage;
* ``store``: the prepared ``.npz`` files and ``meta.json``, written and read;
* ``errors``: :class:`DataError`, the one error type, with its shared messages.
"""
