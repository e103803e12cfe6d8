"""dermconvert: checkpoint -> ONNX bundle -> FP16 ONNX / TensorRT engine, each verified on real images."""
