"""The PACS boundary: DICOM SCP/SCU, pixel conversion, SR writer, conformance.

Never loads a model and never imports ``node``.
"""
