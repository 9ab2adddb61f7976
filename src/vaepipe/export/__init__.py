"""The export layer: the ONNX graphs and their contract (`graphs`, `contract`), the fp16 and
int8 variants (`variants`) and what the export stage registers (`release`)."""
