"""Model code: the ViT image encoder, the split BERT, the vision-language model and weight loading."""
