# One image for the web app, the worker and the bucket bootstrap; the command picks the role.
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
COPY worker ./worker
COPY templates ./templates
COPY static ./static
# Editable install: templates/ and static/ are read from the source tree.
RUN pip install --no-cache-dir -e .

RUN useradd --create-home gallery
USER gallery
EXPOSE 8000
CMD ["gallery", "serve"]
