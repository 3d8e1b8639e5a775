// Builds the installable library (npm pack ships only lib/): ESM and CJS of
// src/taskstream.ts, rxjs left as an import of the app's own copy (a peer
// dependency), not minified, so a consumer's bundler minifies and debugs it.
// The board (vite.config.ts, dist/) is a separate build.
import { defineConfig } from 'vite';

export default defineConfig({
  build: {
    outDir: 'lib',
    emptyOutDir: true,
    target: 'es2020',
    minify: false,
    sourcemap: false,
    reportCompressedSize: false,
    lib: {
      entry: 'src/taskstream.ts',
      formats: ['es', 'cjs'],
      fileName: (format) => (format === 'es' ? 'taskstream.js' : 'taskstream.cjs'),
    },
    rollupOptions: {
      external: [/^rxjs(\/|$)/],
    },
  },
});
