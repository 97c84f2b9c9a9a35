"""The ``padst`` operator set: schemas, fake implementations, autograd and argument checks."""
