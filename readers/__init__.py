"""Readers: a Reader protocol; fid (Fusion-in-Decoder, seq2seq), causal (decoder-only), CIT, training.

A reader kind is added by writing one module with a `BaseReader` subclass and naming it in
`readers.base.READER_KINDS`.
"""
from readers.base import READER_KINDS, BaseReader, Reader, ReaderConfig, ReaderPassage, load_reader, reader_class

__all__ = ["READER_KINDS", "BaseReader", "Reader", "ReaderConfig", "ReaderPassage", "load_reader", "reader_class"]
